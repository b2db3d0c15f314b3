import TraceryX86

extension Tracer {
  // MARK: - Commit

  /// Applies `operations` in one patch batch (see the type's comment) and reports per function.
  /// Relocated prologues the patcher had to abandon (a thread it could not see out of their
  /// first bytes) are traced through an int3 instead, in a second batch (unless
  /// `usesTrapSites` is off or `trapSiteObjects` leaves their object out: they stay untraced,
  /// reported).
  func commit(_ operations: [Operation]) -> TransactionReport {
    var report = withCallerStackMarker { top in commit(operations, callerStack: top) }
    let (trapSites, trapSiteObjects) = state.withLock { ($0.usesTrapSites, $0.trapSiteObjects) }
    guard trapSites else { return report }
    let abandoned = report.addresses { outcome in
      if case .failed(let reason) = outcome { reason.hasPrefix(TextPatcher.abandoned) } else { false }
    }
    guard !abandoned.isEmpty else { return report }
    let table = symbols
    func traps(_ targets: [Target]) -> [Target] {
      targets.compactMap { target in
        guard abandoned.contains(target.patch.function), let index = table.function(containing: target.patch.function),
          trapSiteObjects?.contains(table.objects[table.functions[index].object].path) ?? true,
          let patch = try? PatchSite.trap(
            at: target.patch.function, function: target.patch.function, size: Int(table.functions[index].size))
        else { return nil }
        return Target(patch: patch, name: target.name)
      }
    }
    let retry = operations.compactMap { operation -> Operation? in
      switch operation {
      case .attach(let attachment, let targets, let model):
        let again = traps(targets)
        return again.isEmpty ? nil : .attach(attachment, again, model)
      case .graphAttach(let index, let targets, let model):
        let again = traps(targets)
        return again.isEmpty ? nil : .graphAttach(index, again, model)
      case .opsAttach(let record, let targets):
        let again = traps(targets)
        return again.isEmpty ? nil : .opsAttach(record, again)
      case .multiAttach(let attachments, let targets):
        let again = traps(targets)
        return again.isEmpty ? nil : .multiAttach(attachments, again)
      default:
        return nil
      }
    }
    guard !retry.isEmpty else { return report }
    let second = withCallerStackMarker { top in commit(retry, callerStack: top) }
    report.entries = report.entries.filter { !abandoned.contains($0.address) } + second.entries
    return report
  }

  /// What one commit has decided so far, handed from phase to phase (all under the lock).
  struct CommitPlan {
    /// The new state of every touched function, by site.
    var next: [UInt64: TracedFunction] = [:]
    var graphUsersChanged = false
    var opsChanged = false
    var multiChanged = false
    var removedOps: [OpsRecord] = []
    /// Images every site of which moves in this commit (the user or ops set changed).
    var retiredGraphImages: [GraphImage] = []
    var retiredSharedImages: [OpsSharedImage] = []
    /// The sites to rewrite, with the functions as they will be once rewritten.
    var requests: [PatchRequest] = []
    var planned: [(site: UInt64, function: TracedFunction)] = []
    var report = TransactionReport()
  }

  /// The phases, in order: `plan` (the new attachment lists), `buildImages` (the code each
  /// site will reach), `publishMultiRecords` (records before the sites that read them), then
  /// (phase 4) one `TextPatcher` batch for every site, and `settle` (keep what was patched, undo what was not, retire
  /// what was replaced).
  @inline(never)
  private func commit(_ operations: [Operation], callerStack: UInt64) -> TransactionReport {
    state.withLock { state in
      if operations.count == 1, case .graphDetach(let index) = operations[0],
        let report = detachOnlyGraphUser(index, state: &state, callerStack: callerStack)
      {
        return report
      }
      if operations.count == 1, case .graphAttach(let index, let targets, let model) = operations[0],
        let report = attachFreshGraphUser(index, targets, model: model, state: &state, callerStack: callerStack)
      {
        return report
      }
      var plan = CommitPlan()
      self.plan(operations, into: &plan, state: &state, callerStack: callerStack)
      buildImages(&plan, state: &state)
      publishMultiRecords(&plan, state: &state)
      publishKnownCodeIfSlabsChanged(state: &state)
      let outcomes = patcher.apply(plan.requests, callerStack: callerStack)
      settle(&plan, outcomes: outcomes, state: &state, callerStack: callerStack)
      return plan.report
    }
  }

  /// What a function's site holds in `function`'s state: a `jmp` to its graph stub or its own
  /// trampoline or its multi-attach stub, a `call` to its ops or multi-attach entry, or its
  /// original bytes. The one place that decides a site's bytes (the kernel's
  /// `ftrace_update_record`). Every target was placed within rel32 reach of the site.
  func siteBytes(_ function: TracedFunction) -> SiteBytes {
    let site = function.site
    if let stub = function.graphStub { return SiteBytes.branch(0xe9, at: site, to: stub.block.address)! }
    if let image = function.image { return SiteBytes.branch(0xe9, at: site, to: image.block.address)! }
    if let stub = function.multiStub { return SiteBytes.branch(0xe9, at: site, to: stub)! }
    // Shared trampolines entered by `call` return into the body: it must follow the site.
    precondition(
      function.patch.bodyFollowsBranch || (function.opsEntry == nil && function.multiEntry == nil),
      "a call-form entry needs a site whose body follows its branch")
    if let entry = function.opsEntry { return SiteBytes.branch(0xe8, at: site, to: entry)! }
    if let entry = function.multiEntry { return SiteBytes.branch(0xe8, at: site, to: entry)! }
    return function.original
  }

  /// The request that takes `function`'s site from `old` (its `siteBytes` before) to its
  /// `siteBytes` now. A trap site (`PatchSite.Shape.trap`) keeps one target while it is traced,
  /// its pad (`trapPad`, a `jmp` in its copy's block): tracing it writes the pad, then `int3`
  /// at the site; retargeting it patches the pad's `jmp` live (the site stays as it is); leaving
  /// puts the site's byte back. So the trap table never sends a thread to code being retired.
  /// nil when the pad's `jmp` cannot reach the new code.
  func patchRequest(from old: SiteBytes, for function: TracedFunction) -> PatchRequest? {
    let new = siteBytes(function)
    // A relocated prologue's bytes are about to be overwritten (the patcher moves threads out).
    let installs = old == function.original && new != function.original
    guard function.patch.shape == .trap, let copy = function.relocatedCopy else {
      return PatchRequest(
        site: function.site, expected: old, replacement: new, resume: function.patch.resume,
        relocatedCopy: installs && function.patch.shape == .relocated ? function.patch.resume : 0,
        relocatedLength: installs && function.patch.shape == .relocated ? function.patch.length : 0)
    }
    let pad = copy.block.address + UInt64(Self.trapPad)
    let trapped = SiteBytes(raw: function.original.raw & ~0xff | 0xcc)
    let wasTraced = old != function.original
    let isTraced = new != function.original
    guard isTraced else {
      return PatchRequest(
        site: function.site, expected: wasTraced ? trapped : old, replacement: new, resume: function.patch.resume)
    }
    guard let target = new.branchTarget(at: function.site), let jmp = SiteBytes.branch(0xe9, at: pad, to: target)
    else { return nil }
    guard wasTraced, let oldTarget = old.branchTarget(at: function.site),
      let oldJmp = SiteBytes.branch(0xe9, at: pad, to: oldTarget)
    else {
      // No thread has reached the pad yet: its copy is this traced life's own.
      copy.block.write(jmp.bytes, at: Self.trapPad)
      return PatchRequest(
        site: function.site, expected: function.original, replacement: trapped, resume: function.patch.resume,
        trapTarget: pad)
    }
    return PatchRequest(site: pad, expected: oldJmp, replacement: jmp, resume: pad + 5)
  }

  /// Phase 1: the new attachment lists (and graph masks, ops, multi attachments) of every
  /// function the operations touch, and the functions whose image must move because the set of
  /// graph users or ops changed.
  private func plan(
    _ operations: [Operation], into plan: inout CommitPlan, state: inout State, callerStack: UInt64
  ) {
    // Functions of bulk links that anything attaches to become general functions first.
    if !state.multi.bulk.isEmpty {
      var touched: [UInt64] = []
      for operation in operations {
        switch operation {
        case .attach(_, let targets, _), .graphAttach(_, let targets, _), .opsAttach(_, let targets),
          .multiAttach(_, let targets):
          touched += targets.map(\.site)
        default: break
        }
      }
      migrateFromBulk(touched, state: &state)
    }
    func current(_ target: Target) -> TracedFunction {
      if let function = plan.next[target.site] ?? state.functions[target.site] { return function }
      var function = TracedFunction(
        patch: target.patch, name: target.name, original: SiteBytes(reading: target.site), model: .unknown)
      if target.patch.shape != .nop, let (patch, copy) = try? relocatedCopy(of: target.patch) {
        // (Without room for a copy `resume` stays 0, and `buildImages` reports the function.)
        function.patch = patch
        function.relocatedCopy = copy
      }
      // Padding zeroed after an earlier use (by any tracer) is ours again (`ZeroedPadding`).
      if ZeroedPadding.claim(before: target.site) {
        function.paddingOwned = true
        state.multi.pendingNops.remove(target.site - 8)
      }
      return function
    }
    // (A detach of 50,000 functions: no set of every site, no table grown one insert at a time.)
    var targets = 0
    for operation in operations {
      switch operation {
      case .attach(_, let list, _), .graphAttach(_, let list, _), .opsAttach(_, let list), .multiAttach(_, let list):
        targets += list.count
      default: break
      }
    }
    plan.next.reserveCapacity(max(state.functions.count, targets))
    func remove(_ matches: (TracedFunction) -> Bool, _ change: (inout TracedFunction) -> Void) {
      for site in Array(plan.next.keys) where matches(plan.next[site]!) { change(&plan.next[site]!) }
      for (site, function) in state.functions where plan.next[site] == nil && matches(function) {
        var changed = function
        change(&changed)
        plan.next[site] = changed
      }
    }
    for operation in operations {
      switch operation {
      case .attach(let attachment, let targets, let model):
        for target in targets {
          var function = current(target)
          if let model { function.model = model }
          function.attachments.append(attachment)
          plan.next[target.site] = function
        }
      case .detach(let id):
        remove({ $0.attachments.contains { $0.link.id == id } }) { $0.attachments.removeAll { $0.link.id == id } }
      case .graphAttach(let index, let targets, let model):
        // A user's first functions: every image is remade (images bake in their users' slots and
        // generations). More functions for a user that traces some already change no image
        // (theirs get the image of their new mask): the agent adds each dlopened object's
        // functions so, and each add moved every function traced before to a new stub.
        let bit: UInt16 = 1 << index
        if !state.functions.values.contains(where: { $0.graphMask & bit != 0 }) { plan.graphUsersChanged = true }
        for target in targets {
          var function = current(target)
          if let model { function.model = model }
          function.graphMask |= 1 << index
          plan.next[target.site] = function
        }
      case .graphDetach(let index):
        guard state.graphUsers[index] != nil else { continue }
        plan.graphUsersChanged = true
        state.graphUsers[index] = nil
        // Calls in flight keep their frames but are no longer given to this user's exit.
        GraphThreads.advanceGeneration(index)
        remove({ $0.graphMask & (1 << index) != 0 }) { $0.graphMask &= ~(1 << index) }
      case .graphRemoveSites(let index, let sites):
        plan.graphUsersChanged = true
        let leaving = Set(sites)
        remove({ leaving.contains($0.site) && $0.graphMask & (1 << index) != 0 }) { $0.graphMask &= ~(1 << index) }
      case .opsAttach(let record, let targets):
        plan.opsChanged = true
        state.ops[record.id] = record
        for target in targets {
          var function = current(target)
          function.ops.append(record.id)
          record.sites.insert(target.site)
          plan.next[target.site] = function
        }
      case .multiAttach(let attachments, let targets):
        plan.multiChanged = true
        for (attachment, target) in zip(attachments, targets) {
          var function = current(target)
          function.multi.append(attachment)
          plan.next[target.site] = function
        }
      case .multiDetach(let id):
        plan.multiChanged = true
        _ = detachBulk(id, state: &state, report: &plan.report, callerStack: callerStack)
        remove({ $0.multi.contains { $0.link == id } }) { $0.multi.removeAll { $0.link == id } }
      case .opsDetach(let id):
        guard let record = state.ops.removeValue(forKey: id) else { continue }
        plan.opsChanged = true
        plan.removedOps.append(record)
        remove({ $0.ops.contains(id) }) { $0.ops.removeAll { $0 == id } }
      }
    }
    // Ops added or gone: the shared callers' tables change, so every shared site moves.
    if plan.opsChanged {
      plan.retiredSharedImages = state.opsSharedImages
      state.opsSharedImages = []
      for (site, function) in state.functions where function.opsEntry != nil && plan.next[site] == nil {
        plan.next[site] = function
      }
    }
    // New users or users gone: every graph image is remade, so every graph site moves.
    if plan.graphUsersChanged {
      plan.retiredGraphImages = state.graphImages
      state.graphImages = []
      for (site, function) in state.functions where function.graphMask != 0 && plan.next[site] == nil {
        plan.next[site] = function
      }
    }
  }

  /// Phase 2: for each touched function, the code its site will reach (a per-function
  /// trampoline, a graph stub, an ops or multi-attach entry, or nothing: its original bytes),
  /// and the patch request from what the site holds now to that. A function whose code cannot
  /// be built is reported and left as it is.
  private func buildImages(_ plan: inout CommitPlan, state: inout State) {
    plan.requests.reserveCapacity(plan.next.count)
    plan.planned.reserveCapacity(plan.next.count)
    for site in plan.next.keys.sorted() {
      var function = plan.next[site]!
      let oldBytes = state.functions[site].map(siteBytes) ?? function.original
      function.image = nil
      function.graphStub = nil
      function.graphImage = nil
      function.opsEntry = nil
      function.multiEntry = nil
      function.multiStub = nil
      function.multiStubImage = nil
      do {
        guard function.patch.resume != 0 else {
          throw AttachError.codeMemory("no room for the copy of its first instructions near it")
        }
        // A per-function trampoline runs direct handlers, and ops and multi handlers whenever the
        // function has anything else too; with graph users, the graph stub calls it as the
        // function's body. Ops on a site whose body does not follow it (relocated) need one too:
        // the shared ops callers return into the site; and so do ops on a function whose
        // registers must all be kept (`PatchSite.keepsEveryRegister`).
        let ownTrampoline =
          !function.attachments.isEmpty || (!function.multi.isEmpty && function.multiNeedsOwnTrampoline)
          || (function.graphMask != 0 && !function.ops.isEmpty)
          || (!function.ops.isEmpty && (!function.patch.bodyFollowsBranch || function.patch.keepsEveryRegister))
        if ownTrampoline {
          function.image = try makeImage(for: function, ops: function.ops.compactMap { state.ops[$0] })
        }
        if function.graphMask != 0 {
          (function.graphStub, function.graphImage) = try graphStub(
            for: function, body: function.image?.block.address, state: &state)
        } else if !ownTrampoline && !function.ops.isEmpty {
          function.opsEntry = try opsEntry(for: function, state: &state)
        } else if !ownTrampoline && !function.multi.isEmpty && function.multiNeedsStub {
          let (stub, trampoline) = try multiStub(for: function, state: &state)
          function.multiStubImage = stub
          function.multiStub = stub.block.address
          function.multiEntry = trampoline
        } else if !ownTrampoline && !function.multi.isEmpty {
          function.multiEntry = try multiTrampoline(for: function, from: site, state: &state)
        }
      } catch {
        plan.report.append(.init(function: function.name, address: function.function, outcome: .failed("\(error)")))
        // A copy made for this commit was never reached.
        if state.functions[site] == nil, let copy = function.relocatedCopy { arena.release(copy.block) }
        continue
      }
      guard let request = patchRequest(from: oldBytes, for: function) else {
        plan.report.append(
          .init(
            function: function.name, address: function.function, outcome: .failed("its trap pad cannot reach its code"))
        )
        if state.functions[site] == nil, let copy = function.relocatedCopy { arena.release(copy.block) }
        continue
      }
      plan.requests.append(request)
      plan.planned.append((site, function))
    }
  }

  /// Phase 3: the multi-attach records (a site must find its record before it calls a global
  /// trampoline). Whether a function uses its padding is decided while its NOPs are still there.
  /// Functions whose record could not be published are dropped from the batch and reported.
  private func publishMultiRecords(_ plan: inout CommitPlan, state: inout State) {
    for index in plan.planned.indices
    where plan.planned[index].function.multiEntry != nil && plan.planned[index].function.usesPadding {
      plan.planned[index].function.paddingOwned = true
    }
    var multiFailed: Set<UInt64> = []
    // Any function moving into or out of a global trampoline changes the records too.
    if plan.multiChanged
      || plan.planned.contains(where: {
        $0.function.multiEntry != nil || state.functions[$0.site]?.multiEntry != nil
      })
    {
      var global = state.functions.filter { plan.next[$0.key] == nil && $0.value.multiEntry != nil }.map(\.value)
      global += plan.planned.map(\.function).filter { $0.multiEntry != nil }
      do {
        multiFailed = try publishMultiTable(global.sorted { $0.site < $1.site }, state: &state)
      } catch {
        multiFailed = Set(plan.planned.filter { $0.function.multiEntry != nil }.map(\.site))
      }
    }
    for index in plan.planned.indices.reversed() where multiFailed.contains(plan.planned[index].site) {
      plan.report.append(
        .init(
          function: plan.planned[index].function.name, address: plan.planned[index].function.function,
          outcome: .failed("cannot write its record pointer into its padding")))
      if let stub = plan.planned[index].function.multiStubImage { arena.release(stub.block) }
      if state.functions[plan.planned[index].site] == nil, let copy = plan.planned[index].function.relocatedCopy {
        arena.release(copy.block)
      }
      plan.planned.remove(at: index)
      plan.requests.remove(at: index)
    }
  }

  /// Phase 5 (after the batch): keep what was patched, free what was built for sites that were
  /// not; register the new trampolines' unwind table (one for the whole commit); clear padding
  /// that no longer holds a record; retire replaced images and the graph images and shared ops
  /// callers no site calls any more; reclaim when due.
  private func settle(_ plan: inout CommitPlan, outcomes: [PatchOutcome], state: inout State, callerStack: UInt64) {
    // (Indices into `plan.planned`, whose functions are read and changed in place: each copy of
    // a function's state costs, and a commit may have 50,000.)
    var live: [Int] = []
    var failed: [CodeArena.Block] = []
    live.reserveCapacity(plan.planned.count)
    for (index, outcome) in zip(plan.planned.indices, outcomes) {
      let site = plan.planned[index].site
      plan.report.append(
        .init(
          function: plan.planned[index].function.name, address: plan.planned[index].function.function,
          outcome: outcome))
      if case .failed(let reason) = outcome {
        let function = plan.planned[index].function
        let built = [function.image, function.graphStub, function.multiStubImage].compactMap { $0 }
        let copy = state.functions[site] == nil ? function.relocatedCopy : nil
        if reason.hasPrefix(TextPatcher.abandoned) {
          // Its int3 stood for a while: a thread that trapped then may be running this code.
          for image in built + [copy].compactMap({ $0 }) { state.reclaimer.retire(image) }
        } else {
          failed += built.map(\.block) + [copy?.block].compactMap { $0 }
        }
        continue
      }
      if let old = state.functions.index(forKey: site) {
        if let image = state.functions.values[old].image { state.reclaimer.retire(image) }
        if let stub = state.functions.values[old].graphStub { state.reclaimer.retire(stub) }
        if let stub = state.functions.values[old].multiStubImage { retireStub(stub, state: &state) }
      }
      live.append(index)
    }
    arena.release(contentsOf: failed)
    let images = live.compactMap { plan.planned[$0].function.image }
    let table =
      UnwindInfo.isAvailable && !images.isEmpty
      ? UnwindInfo(images.map { .init(block: $0.block, length: $0.length, frame: $0.frame!) }, arena: arena) : nil
    // Padding that no longer holds a live record pointer: 0 (a trampoline reading it then
    // finds no record). A function leaving for good gets its NOPs back once no thread is inside
    // a global trampoline (one may have called it just before its site changed).
    var cleared: [(address: UInt64, value: UInt64)] = []
    state.functions.reserveCapacity(state.functions.count + live.count)
    for index in live {
      let site = plan.planned[index].site
      plan.planned[index].function.image?.unwind = table
      let traced = plan.planned[index].function.isTraced
      if plan.planned[index].function.paddingOwned
        && (plan.planned[index].function.multiEntry == nil || !plan.planned[index].function.usesPadding)
      {
        cleared.append((site - 8, 0))
        if !traced { state.multi.pendingNops.insert(site - 8) }
        plan.planned[index].function.paddingOwned = traced
      }
      state.functions[site] = traced ? plan.planned[index].function : nil
      // Back to its original bytes: its copy goes once no thread runs in it.
      if !traced, let copy = plan.planned[index].function.relocatedCopy { state.reclaimer.retire(copy) }
    }
    _ = patcher.writeWords(cleared)
    ZeroedPadding.add(cleared.map(\.address))
    retireOrphanStubs(state: &state)
    restorePaddingNops(state: &state, callerStack: callerStack)
    retireGraphImages(plan.retiredGraphImages, state: &state)
    // Shared ops callers are retired once no site calls them.
    var calledByOps: Set<UInt64> = []
    if !plan.retiredSharedImages.isEmpty || !plan.removedOps.isEmpty {
      for index in state.functions.indices {
        if let entry = state.functions.values[index].opsEntry { calledByOps.insert(entry) }
      }
    }
    state.opsSharedImages += state.reclaimer.retire(
      plan.retiredSharedImages, unlessCalled: calledByOps, entry: \.entry, image: \.image)
    // The own trampolines of ops that left.
    for record in plan.removedOps {
      for image in record.ownImages where !calledByOps.contains(image.block.address) {
        state.reclaimer.retire(image)
      }
    }
    if state.reclaimer.isDue(now: System.monotonicNanoseconds()) {
      _ = state.reclaimer.reclaim(arena: arena, callerStack: callerStack)
    }
  }

  /// Old graph images are retired once no site calls them (`replaced`: a site that failed to
  /// move keeps its image, and the image stays listed); so is a listed image no function uses
  /// any more (its functions moved to another model, failed to move to it, or left).
  func retireGraphImages(_ replaced: [GraphImage], state: inout State) {
    var called: Set<UInt64> = []
    for index in state.functions.indices {
      if let entry = state.functions.values[index].graphImage { called.insert(entry) }
    }
    let unused = replaced + state.graphImages.filter { !called.contains($0.entry) }
    state.graphImages.removeAll { !called.contains($0.entry) }
    state.graphImages += state.reclaimer.retire(unused, unlessCalled: called, entry: \.entry, image: \.image)
  }

  /// The per-function trampoline of `function`; its ops' callbacks run first, as entry handlers,
  /// and its multi handlers after its own of each kind.
  private func makeImage(for function: TracedFunction, ops: [OpsRecord]) throws -> CodeImage {
    let model =
      function.model.stackArgumentWords == nil && !function.multi.isEmpty ? function.multiClass : function.model
    let exits = function.attachments.filter { $0.handler.kind == .exit }
    let modifies = function.attachments.filter { $0.handler.kind == .modifyReturn }
    if !exits.isEmpty || !modifies.isEmpty, model.stackArgumentWords == nil {
      throw AttachError.unsupportedModel(
        function: function.name,
        reason: "exit and modify-return handlers call the original, which needs its stack arguments; "
          + "pass a FunctionModel with stackArgumentWords")
    }
    func calls(_ kind: HandlerKind) -> [HandlerCall] {
      function.attachments.filter { $0.handler.kind == kind }.map {
        HandlerCall(
          handler: $0.handler.address, cookie: $0.link.cookie, counters: $0.link.counters.address,
          statistics: $0.statistics)
      } + function.multi.filter { $0.kind == kind }.map(\.handlerCall)
    }
    let emitter = TrampolineEmitter(
      patch: function.patch, model: model, entries: ops.map(\.handlerCall) + calls(.entry),
      modifyReturns: calls(.modifyReturn), exits: calls(.exit), guardOffset: guardOffset)
    // A handler call is 8 bytes longer where the handler is out of rel32 reach.
    let (block, code) = try placeCode(
      near: function.site, slack: 8 * (function.attachments.count + ops.count + function.multi.count),
      emit: emitter.emit(at:), bytes: \.bytes)
    return CodeImage(
      block: block, length: code.bytes.count, frame: code.frame, unwind: nil,
      counters: function.attachments.map(\.link.counters) + ops.map(\.counters))
  }

  /// Code placed where it will run, for every kind of generated code: emitted once at `near`
  /// for its size (plus `slack` bytes: an instruction may take a longer form where the code
  /// lands, e.g. a call out of rel32 reach), a block allocated within rel32 reach of `near`,
  /// the code emitted again at the block's address and written there. The block is released
  /// when the second emission fails.
  func placeCode<Code>(
    near: UInt64, slack: Int, alignment: Int = CodeArena.hotCodeAlignment, emit: (UInt64) throws -> Code,
    bytes: (Code) -> [UInt8]
  ) throws -> (block: CodeArena.Block, code: Code) {
    let size = try bytes(emit(near)).count + slack
    let block: CodeArena.Block
    do { block = try arena.allocate(near: near, size: size, alignment: alignment) } catch {
      throw AttachError.codeMemory("\(error)")
    }
    do {
      let code = try emit(block.address)
      block.write(bytes(code))
      return (block, code)
    } catch {
      arena.release(block)
      throw error
    }
  }
}
