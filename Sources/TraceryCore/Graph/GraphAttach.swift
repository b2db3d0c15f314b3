extension Tracer {
  /// A graph user's first attach in a tracer that traces nothing yet (the agent's start in
  /// every traced process): the stubs of runs of neighbouring sites allocated as one block and
  /// written together, each function's state made once, without the general commit's phases,
  /// which copy each function's state several times through tables as large as the attach (for
  /// 50,000 functions, ~70 ms of a traced process's start). The state it leaves is the one the
  /// general path would: a `TracedFunction` per site with its own stub (a slice of the run's
  /// block, released or retired on its own; a function without a NOP site gets the copy of its
  /// first instructions, and a trap site its pad, as in the general path). nil when the general
  /// path is needed: the tracer traces something already.
  func attachFreshGraphUser(
    _ user: Int, _ targets: [Target], model: FunctionModel?, state: inout State, callerStack: UInt64
  ) -> TransactionReport? {
    guard state.functions.isEmpty, state.graphImages.isEmpty, state.multi.bulk.isEmpty,
      state.graphUsers[user] != nil
    else { return nil }
    // Prologues moved out of line while other threads run (`record -p`, gcc's sleds) take the
    // general path: through this one, relocations were abandoned more often (a thread seen
    // holding an address inside the first bytes), cause not found yet.
    if targets.contains(where: { $0.patch.shape != .nop }), Reclaimer.threadIDs().count > 1 { return nil }
    // In site order, each site once (aliases name one function: the general path's plan keeps
    // one state per site too).
    var order = targets.indices.sorted { targets[$0].site < targets[$1].site }
    order = order.indices.compactMap {
      $0 > 0 && targets[order[$0]].site == targets[order[$0 - 1]].site ? nil : order[$0]
    }
    // Each function's state goes into the table as it is made (no other copy: 50,000 copies
    // and their releases were a fifth of this attach); those whose site could not be patched
    // leave it again.
    var sites: [UInt64] = []
    var requests: [PatchRequest] = []
    var failures = TransactionReport()
    sites.reserveCapacity(targets.count)
    requests.reserveCapacity(targets.count)
    state.functions.reserveCapacity(targets.count)
    var start = 0
    while start < order.count {
      // A run: up to `runLength` sites within `runSpan` bytes of its first, whose stubs share
      // one block near it.
      let first = targets[order[start]].site
      var end = start + 1
      while end < order.count, end - start < Self.runLength, targets[order[end]].site - first < Self.runSpan {
        end += 1
      }
      let run = order[start..<end]
      start = end
      let block = try? arena.allocate(
        near: first, size: run.count * GraphEmitter.stubSize, alignment: GraphEmitter.stubSize)
      var unused: [CodeArena.Block] = []
      // A slot no stub is written to: int3s, released with the others after the run.
      func giveBack(_ stub: CodeArena.Block?) {
        guard let stub else { return }
        UnsafeMutableRawPointer(bitPattern: UInt(stub.alias))!.initializeMemory(
          as: UInt8.self, repeating: 0xcc, count: GraphEmitter.stubSize)
        unused.append(stub)
      }
      for (slot, index) in run.enumerated() {
        let target = targets[index]
        var function = TracedFunction(
          patch: target.patch, name: target.name, original: SiteBytes(reading: target.site), model: model ?? .unknown)
        function.graphMask = 1 << user
        let stub = block.map { block in
          CodeArena.Block(
            address: block.address + UInt64(slot * GraphEmitter.stubSize), size: GraphEmitter.stubSize,
            alias: block.alias + UInt64(slot * GraphEmitter.stubSize))
        }
        if target.patch.shape != .nop {
          // Its first instructions out of line (and a trap site's pad), as `plan` makes them.
          guard let (patch, copy) = try? relocatedCopy(of: target.patch) else {
            let error = AttachError.codeMemory("no room for the copy of its first instructions near it")
            failures.append(.init(function: target.name, address: target.function, outcome: .failed("\(error)")))
            giveBack(stub)
            continue
          }
          function.patch = patch
          function.relocatedCopy = copy
        }
        // Padding zeroed after an earlier use (by any tracer) is ours again (`ZeroedPadding`).
        if ZeroedPadding.claim(before: target.site) {
          function.paddingOwned = true
          state.multi.pendingNops.remove(target.site - 8)
        }
        // Its stub in the run's block (written in place through the block's writable alias: no
        // thread can run it before its site is patched), calling the graph image for its mask
        // and model.
        if let stub,
          let image = try? graphImage(
            mask: function.graphMask, model: function.model, preservesAll: function.patch.shape != .nop,
            near: stub.address, state: &state),
          GraphEmitter.writeStub(
            into: UnsafeMutableRawPointer(bitPattern: UInt(stub.alias))!, at: stub.address, site: target.site,
            body: function.patch.resume, entry: image.entry, returnHandler: image.returnHandler)
        {
          let stubImage = CodeImage(block: stub, length: GraphEmitter.stubSize)
          stubImage.leadsTo = [image.entry]
          function.graphStub = stubImage
          function.graphImage = image.entry
        }
        guard function.graphStub != nil, let request = patchRequest(from: function.original, for: function) else {
          // No block, or out of its reach: a stub of its own, as the general path makes. (The
          // slot is released after the run: the new stub may not land in it.)
          giveBack(stub)
          do {
            (function.graphStub, function.graphImage) = try graphStub(for: function, body: nil, state: &state)
            guard let request = patchRequest(from: function.original, for: function) else {
              throw AttachError.codeMemory("graph stub out of reach of 0x\(String(target.site, radix: 16))")
            }
            requests.append(request)
            sites.append(target.site)
            state.functions[target.site] = function
          } catch {
            failures.append(.init(function: function.name, address: function.function, outcome: .failed("\(error)")))
            if let copy = function.relocatedCopy { arena.release(copy.block) }
          }
          continue
        }
        requests.append(request)
        sites.append(target.site)
        state.functions[target.site] = function
      }
      arena.release(contentsOf: unused)
    }
    publishKnownCodeIfSlabsChanged(state: &state)
    let outcomes = patcher.apply(requests, callerStack: callerStack)
    var cleared: [(address: UInt64, value: UInt64)] = []
    var failed: [CodeArena.Block] = []
    var names: [String] = []
    var addresses: [UInt64] = []
    names.reserveCapacity(sites.count)
    addresses.reserveCapacity(sites.count)
    for (site, outcome) in zip(sites, outcomes) {
      let index = state.functions.index(forKey: site)!
      names.append(state.functions.values[index].name)
      addresses.append(state.functions.values[index].function)
      guard case .patched = outcome else {
        let function = state.functions.remove(at: index).value
        let built = [function.graphStub, function.relocatedCopy].compactMap { $0 }
        if case .failed(let reason) = outcome, reason.hasPrefix(TextPatcher.abandoned) {
          // Its int3 stood for a while: a thread that trapped then may be running this code.
          for image in built { state.reclaimer.retire(image) }
        } else {
          failed += built.map(\.block)
        }
        continue
      }
      // Padding it owns holds no record: 0, as the general path leaves it.
      if state.functions.values[index].paddingOwned { cleared.append((site - 8, 0)) }
    }
    arena.release(contentsOf: failed)
    _ = patcher.writeWords(cleared)
    ZeroedPadding.add(cleared.map(\.address))
    // Graph images no site reaches (every function of one failed) go.
    if !failed.isEmpty || state.functions.count < sites.count || !failures.entries.isEmpty {
      retireGraphImages([], state: &state)
    }
    if state.reclaimer.isDue(now: System.monotonicNanoseconds()) {
      _ = state.reclaimer.reclaim(arena: arena, callerStack: callerStack)
    }
    var report = failures
    report.append(TransactionReport.Batch(names: names, addresses: addresses, outcomes: outcomes))
    return report
  }

  /// At most this many stubs share a block, and their sites lie within this many bytes of the
  /// run's first (so that one block near it reaches them all).
  static let runLength = 2048
  static let runSpan: UInt64 = 1 << 26
}
