import CTraceryShims
import TraceryX86

/// A multi link kept as arrays: the fast path of `attachMulti` for thousands of functions (the
/// kernel's tracing multi-link goal: 50,000 functions attached in milliseconds). Functions that nothing else traces
/// join a bulk link without a `TracedFunction` each: sorted site, entry, name and cookie arrays,
/// and one block of 48-byte records that stays where it is for the link's life, so its padding
/// pointers (or hash slots) are written once per record.
///
/// A function of a bulk link that anything else attaches to later leaves the link first
/// (`Tracer.migrateFromBulk`) and carries on as a `TracedFunction` with the same multi
/// attachment; the general commit takes it from there. The shared hash table's slots point into
/// hash-mode links' record blocks: a detached link's block is retired as a companion of the
/// table that last pointed into it (a hash reader's hazard on that table covers the record it is
/// about to take).
///
/// Protocol: all under the tracer's lock.
struct BulkLink {
  let id: Int
  let kind: HandlerKind
  let handler: UInt64
  let model: FunctionModel
  var padding: Bool
  /// Sorted by site; the other arrays are parallel to it.
  var sites: [UInt64]
  var functions: [UInt64]
  var names: [String]
  var cookies: [UInt64]
  /// The 5 bytes each site held (packed `SiteBytes`): its NOP (compilers use different ones), or
  /// a relocated function's first bytes.
  var originals: [UInt64]
  /// Where each site branches: the global trampoline it calls, or (`viaStubs`) its stub.
  var entries: [UInt64]
  /// Exit or modify-return links: each site jumps to its own `MultiStub`, in `stubBlocks`
  /// (one per ±2 GiB region, written once at attach, retired at detach).
  var viaStubs: Bool
  /// Entry links of relocated functions (built without a patch site): each site jumps to its
  /// own `PrologueStub` in `stubBlocks`, which holds the function's moved instructions; the
  /// records are found by hash. `lengths` (parallel to `sites`) are the bytes each moved, and
  /// `verbatim` whether they move unchanged (`PatchSite.movesVerbatim`).
  var relocated = false
  var lengths: [UInt8] = []
  var verbatim: [Bool] = []
  var stubBlocks: [CodeImage]
  /// The records, `recordWords` words each; `recordOffsets[i]` is the word offset
  /// of the record of `sites[i]` (records do not move when sites leave).
  var records: CodeImage?
  var recordOffsets: [Int32]

  static let recordWords = MultiRecord.words(handlers: 1)

  func index(of site: UInt64) -> Int? {
    var low = 0
    var high = sites.count
    while low < high {
      let middle = (low + high) / 2
      if sites[middle] < site { low = middle + 1 } else { high = middle }
    }
    return low < sites.count && sites[low] == site ? low : nil
  }

  var strategy: MultiStrategy { .global(padding ? .padding : .hash) }

  /// The branch opcode of its sites: `jmp` to a stub, or `call` the trampoline.
  var opcode: UInt8 { viaStubs || relocated ? 0xe9 : 0xe8 }

  /// Where the function at `index` goes on after its site: its moved instructions in its stub,
  /// or the bytes after its NOP.
  func resume(_ index: Int) -> UInt64 {
    relocated ? entries[index] + UInt64(PrologueStub.copyOffset - PrologueStub.entryOffset) : sites[index] + 5
  }

  /// The patch site of the function at `index`: its NOP, or its relocated prologue whose copy
  /// is in its stub.
  func patch(_ index: Int) -> PatchSite {
    guard relocated else { return .nop(at: sites[index], function: functions[index]) }
    return PatchSite(
      function: functions[index], address: sites[index], resume: resume(index), length: lengths[index],
      shape: .relocated, movesVerbatim: verbatim[index])
  }

  /// The request that patches the site at `index` (`attaching`) or puts its bytes back.
  func request(_ index: Int, attaching: Bool) -> PatchRequest {
    let original = SiteBytes(raw: originals[index])
    let bytes = siteBytes(index)
    guard relocated else {
      return PatchRequest(
        site: sites[index], expected: attaching ? original : bytes, replacement: attaching ? bytes : original)
    }
    // A thread stopped inside the bytes that move is moved into the copy first (the patcher's
    // step 4½); one that reaches the site's int3 meanwhile goes on in the copy.
    return PatchRequest(
      site: sites[index], expected: attaching ? original : bytes, replacement: attaching ? bytes : original,
      resume: resume(index), relocatedCopy: attaching ? resume(index) : 0,
      relocatedLength: attaching ? lengths[index] : 0)
  }

  /// The bytes of the site at `index` while it is attached.
  func siteBytes(_ index: Int) -> SiteBytes { SiteBytes.branch(opcode, at: sites[index], to: entries[index])! }

  func attachment(_ index: Int) -> MultiAttachment {
    MultiAttachment(
      link: id, kind: kind, handler: handler, cookie: cookies[index], model: model, strategy: strategy)
  }

  /// Writes the record of one handler of `kind` with `cookie` at `words` (see `MultiEmitter`).

  /// Removes the sites at `indices` (ascending).
  mutating func remove(_ indices: [Int]) {
    guard !indices.isEmpty else { return }
    var keep = [Bool](repeating: true, count: sites.count)
    for index in indices { keep[index] = false }
    func filtered<T>(_ array: [T]) -> [T] { array.indices.filter { keep[$0] }.map { array[$0] } }
    sites = filtered(sites)
    functions = filtered(functions)
    names = filtered(names)
    cookies = filtered(cookies)
    originals = filtered(originals)
    entries = filtered(entries)
    if !lengths.isEmpty { lengths = filtered(lengths) }
    if !verbatim.isEmpty { verbatim = filtered(verbatim) }
    if !recordOffsets.isEmpty { recordOffsets = filtered(recordOffsets) }
  }
}

extension Tracer {
  /// Attaches `handler` to those of `targets` nothing traces yet, as one bulk link, in one patch
  /// batch; returns the targets (indices) left for the general path (already traced, or without the
  /// padding `.padding` asks for) and the report of the bulk ones. Precondition: `lookup` comes
  /// from a `.global` strategy. Entry handlers on relocated functions (`PatchSite.Shape.relocated`)
  /// join a second bulk link of the same id, through `PrologueStub`s (by hash: such functions
  /// have no padding).
  ///
  /// One pass over the targets decides who joins and fills the link's arrays (at 50,000 targets
  /// every pass and every per-target allocation shows in the attach time).
  func attachBulk(
    id: Int, kind: HandlerKind, handler: UInt64, model: FunctionModel, lookup: MultiLookup,
    targets: [Target], cookies: [UInt64], state: inout State, callerStack: UInt64
  ) throws(AttachError) -> (rest: [Int], report: TransactionReport) {
    // Targets usually come sorted by address (symbol-table order); sort only when they do not.
    // (Through the buffer: the array's elements were each copied, name and all, to be compared.)
    let order: [Int]? =
      targets.withUnsafeBufferPointer { $0.isAscending(strictly: true, by: { $0.site }) }
      ? nil : targets.indices.sorted { targets[$0].site < targets[$1].site }
    // Relocated functions join only entry links found by hash.
    let mayRelocate = kind == .entry && lookup != .padding
    // Each link's arrays as columns filled in one pass (appends to seven arrays of a link per
    // target, each checking its array's uniqueness and room, were most of this pass at 50,000).
    let joining = (
      link: BulkColumns(capacity: targets.count), prologues: BulkColumns(capacity: mayRelocate ? targets.count : 0)
    )
    var rest: [Int] = []
    let checkTraced = !state.functions.isEmpty || !state.multi.bulk.isEmpty
    var allPadded = true
    // Zeroed padding words this pass took (`ZeroedPadding`): handed back unless used.
    var claimed: [UInt64] = []
    var previous: UInt64 = 0
    // Each target's fields read in place (a copy of each `Target`, name and all, was a quarter
    // of this pass at 50,000).
    targets.withUnsafeBufferPointer { targets in
      for position in targets.indices {
        let index = order?[position] ?? position
        let site = targets[index].site
        let original = SiteBytes(reading: site)
        let relocates = mayRelocate && targets[index].patch.shape == .relocated
        // Who may join: untraced, in no bulk link, each site once, a NOP at the site (or a
        // relocated entry-only one).
        var joins = site != previous && (original.isNop5 || relocates)
        if joins && checkTraced {
          joins = state.functions[site] == nil && state.multi.bulkLink(containing: site) == nil
        }
        previous = site
        if joins && relocates {
          joining.prologues.append(
            index, site: site, function: targets[index].function, name: targets[index].name, cookie: cookies[index],
            original: original.raw, length: targets[index].patch.length, verbatim: targets[index].patch.movesVerbatim)
          continue
        }
        let function = targets[index].function
        if joins && lookup != .hash {
          var padded = site == function && ZeroedPadding.word(before: site) == ZeroedPadding.nops
          if site == function && !padded && ZeroedPadding.claim(before: site) {
            padded = true
            claimed.append(site - 8)
          }
          // `.padding` without padding: the general path reports it.
          if lookup == .padding && !padded { joins = false }
          allPadded = allPadded && padded
        }
        guard joins else {
          rest.append(index)
          continue
        }
        joining.link.append(
          index, site: site, function: function, name: targets[index].name, cookie: cookies[index],
          original: original.raw, length: 0, verbatim: false)
      }
    }
    let link = joining.link.link(
      id: id, kind: kind, handler: handler, model: model,
      padding: lookup == .padding || (lookup == .automatic && allPadded), relocated: false)
    let prologues = joining.prologues.link(
      id: id, kind: kind, handler: handler, model: model, padding: false, relocated: true)
    let prologueTargets = joining.prologues.targetIndices
    if link.padding {
      for address in claimed { state.multi.pendingNops.remove(address) }
      // A `.padding` target refused above may have had its word claimed: not joining, it goes back.
      let joined = Set(link.sites.lazy.map { $0 - 8 })
      ZeroedPadding.add(claimed.filter { !joined.contains($0) })
    } else {
      ZeroedPadding.add(claimed)
    }
    var report = TransactionReport()
    if !link.sites.isEmpty { report = try attachBulk(link, state: &state, callerStack: callerStack).report }
    if !prologues.sites.isEmpty {
      do {
        let (prologueReport, abandoned) = try attachBulk(prologues, state: &state, callerStack: callerStack)
        report.append(contentsOf: prologueReport)
        // Relocations abandoned (a thread was seen inside the bytes that move) are left to the
        // general path, which retries them (an int3 site when they cannot move).
        if !abandoned.isEmpty {
          let target = Dictionary(uniqueKeysWithValues: zip(prologues.sites, prologueTargets))
          rest = (rest + abandoned.compactMap { target[$0] }).sorted()
        }
      } catch {
        // (No code memory near them, say: the general path tries each, and reports it.)
        rest = (rest + prologueTargets).sorted()
      }
    }
    return (rest, report)
  }

  /// Publishes `link`'s records, patches its sites, and keeps it (minus the sites that failed).
  /// Returns the report, and the sites of a relocated link whose relocation was abandoned (not in
  /// the report: the caller retries them).
  private func attachBulk(
    _ newLink: BulkLink, state: inout State, callerStack: UInt64
  ) throws(AttachError) -> (report: TransactionReport, abandoned: [UInt64]) {
    var link = newLink
    let padding = link.padding
    let kind = link.kind
    let handler = link.handler
    var report = TransactionReport()
    // The global trampoline of the class near each site (one per region; remembered across
    // sites), and each site's stub when the link has them.
    let key = MultiKey(
      integerArguments: link.model.integerArguments, floats: link.model.floatArguments > 0, padding: padding,
      stub: link.viaStubs, keepsEveryRegister: link.relocated)
    var unreachable: [Int] = []
    link.entries.reserveCapacity(link.sites.count)
    if link.viaStubs || link.relocated {
      placeStubs(&link, key: key, unreachable: &unreachable, report: &report, state: &state)
    } else {
      var entry: UInt64 = 0
      for (index, site) in link.sites.enumerated() {
        if entry == 0 || SiteBytes.branch(0xe8, at: site, to: entry) == nil {
          do {
            entry = try globalTrampoline(key: key, model: link.model, near: site, state: &state)
          } catch {
            entry = 0
            report.append(
              .init(function: link.names[index], address: link.functions[index], outcome: .failed("\(error)")))
            unreachable.append(index)
          }
        }
        link.entries.append(entry)
      }
    }
    link.remove(unreachable)
    guard !link.sites.isEmpty else {
      for stubs in link.stubBlocks { arena.release(stubs.block) }
      return (report, [])
    }

    // One read of the memory map for the padding words and the sites (both under our lock).
    let map = MemoryMap.current()
    // The records, written once; then, before any site calls the trampoline, the padding
    // pointers or the shared hash table that lead to them.
    let words = link.sites.count * BulkLink.recordWords
    let block: CodeArena.Block
    do { block = try arena.allocate(near: link.sites[0], size: 8 * words) } catch {
      throw AttachError.codeMemory("\(error)")
    }
    let pointer = block.words(count: words)
    link.recordOffsets.reserveCapacity(link.sites.count)
    for index in link.sites.indices {
      let offset = index * BulkLink.recordWords
      MultiRecord.write(pointer + offset, kind: kind, handler: handler, cookie: link.cookies[index])
      link.recordOffsets.append(Int32(offset))
    }
    link.records = CodeImage(block: block, length: 8 * words)
    if link.viaStubs && !padding {
      // Each stub leads its trampoline straight to its record (`MultiStub.recordOffset`).
      arena.storeWords(
        link.sites.indices.map {
          (link.entries[$0] + UInt64(MultiStub.recordOffset), block.address + UInt64(8 * link.recordOffsets[$0]))
        })
    }
    if padding {
      var pointers: [(address: UInt64, value: UInt64)] = []
      pointers.reserveCapacity(link.sites.count)
      for index in link.sites.indices {
        pointers.append((link.sites[index] - 8, block.address + UInt64(8 * link.recordOffsets[index])))
      }
      let failed = Set(patcher.writeWords(pointers, map: map))
      if !failed.isEmpty {
        let indices = link.sites.indices.filter { failed.contains(link.sites[$0] - 8) }
        for index in indices {
          report.append(
            .init(
              function: link.names[index], address: link.functions[index],
              outcome: .failed("cannot write its record pointer into its padding")))
        }
        link.remove(indices)
      }
      state.multi.bulk.append(link)
    } else {
      state.multi.bulk.append(link)
      do { _ = try publishMultiTable(currentGlobalFunctions(state), state: &state) } catch {
        state.multi.bulk.removeLast()
        arena.release(contentsOf: [block] + link.stubBlocks.map(\.block))
        throw error as? AttachError ?? .codeMemory("\(error)")
      }
    }

    // One batch for every site.
    let requests = link.sites.indices.map { link.request($0, attaching: true) }
    let outcomes = patcher.apply(requests, map: map, callerStack: callerStack)
    var failedIndices: [Int] = []
    var abandoned: [Int] = []
    for (index, outcome) in outcomes.enumerated() {
      guard case .failed(let reason) = outcome else { continue }
      failedIndices.append(index)
      // (Its stub stays in the link's block, retired with it: a thread that met the site's
      // int3 meanwhile may be running its copy.)
      if link.relocated && reason.hasPrefix(TextPatcher.abandoned) { abandoned.append(index) }
    }
    if abandoned.isEmpty {
      report.append(TransactionReport.Batch(names: link.names, addresses: link.functions, outcomes: outcomes))
    } else {
      let retried = Set(abandoned)
      let kept = link.sites.indices.filter { !retried.contains($0) }
      report.append(
        TransactionReport.Batch(
          names: kept.map { link.names[$0] }, addresses: kept.map { link.functions[$0] },
          outcomes: kept.map { outcomes[$0] }))
    }
    if !failedIndices.isEmpty {
      let position = state.multi.bulk.count - 1
      if padding {
        // Never called through: the padding can have its NOPs back at once.
        _ = patcher.writeWords(failedIndices.map { (state.multi.bulk[position].sites[$0] - 8, ZeroedPadding.nops) })
      }
      state.multi.bulk[position].remove(failedIndices)
      if !padding { _ = try? publishMultiTable(currentGlobalFunctions(state), state: &state) }
    }
    return (report, abandoned.map { link.sites[$0] })
  }

  /// The general functions a global trampoline serves now.
  func currentGlobalFunctions(_ state: borrowing State) -> [TracedFunction] {
    state.functions.values.filter { $0.multiEntry != nil }.sorted { $0.site < $1.site }
  }

  /// Takes the functions at `sites` out of their bulk links into `state.functions`, as general
  /// functions with the same multi attachment, trampoline and padding ownership.
  func migrateFromBulk(_ sites: [UInt64], state: inout State) {
    guard !state.multi.bulk.isEmpty else { return }
    for position in state.multi.bulk.indices {
      var leaving: [Int] = []
      for site in sites {
        if let index = state.multi.bulk[position].index(of: site) { leaving.append(index) }
      }
      guard !leaving.isEmpty else { continue }
      leaving.sort()
      let link = state.multi.bulk[position]
      for index in leaving {
        // A relocated function goes on in the copy in its stub (which is kept while a function
        // leads into it: `Tracer.usedStubAddresses`).
        var function = TracedFunction(
          patch: link.patch(index), name: link.names[index], original: SiteBytes(raw: link.originals[index]),
          model: .unknown)
        function.multi = [link.attachment(index)]
        if link.viaStubs || link.relocated {
          function.multiStub = link.entries[index]
          function.multiEntry = MultiStub.trampoline(of: link.entries[index])
        } else {
          function.multiEntry = link.entries[index]
        }
        function.paddingOwned = link.padding
        state.functions[link.sites[index]] = function
      }
      state.multi.bulk[position].remove(leaving)
    }
  }

  /// Detaches bulk link `id` (one patch batch back to NOPs, or to the relocated functions' first
  /// bytes, per link of that id); false when it is not a bulk link.
  func detachBulk(_ id: Int, state: inout State, report: inout TransactionReport, callerStack: UInt64) -> Bool {
    var found = false
    while let position = state.multi.bulk.firstIndex(where: { $0.id == id }) {
      detachBulk(at: position, state: &state, report: &report, callerStack: callerStack)
      found = true
    }
    return found
  }

  private func detachBulk(at position: Int, state: inout State, report: inout TransactionReport, callerStack: UInt64) {
    let link = state.multi.bulk.remove(at: position)
    let requests = link.sites.indices.map { link.request($0, attaching: false) }
    let outcomes = patcher.apply(requests, callerStack: callerStack)
    report.append(TransactionReport.Batch(names: link.names, addresses: link.functions, outcomes: outcomes))
    // Stubs: a site that could not be restored jumps to its stub for good (its block is never
    // freed, as its padding keeps 0); a function that left the link for the general bookkeeping
    // may still jump to one until its commit settles (`orphanStubs`).
    let stuck = link.sites.indices.filter { if case .failed = outcomes[$0] { true } else { false } }.map {
      link.entries[$0]
    }
    let moved = usedStubAddresses(state)
    for stubs in link.stubBlocks {
      if stuck.contains(where: stubs.block.range.contains) { continue }
      if moved.contains(where: stubs.block.range.contains) {
        state.multi.orphanStubs.append(stubs)
      } else {
        retireStub(stubs, state: &state)
      }
    }
    if link.padding {
      // A site that could not be restored still calls the trampoline: its padding keeps 0 (no
      // record). The others get their NOPs back at once when no thread is inside a global
      // trampoline; else 0 now (a thread already inside finds no record) and NOPs later
      // (`restorePaddingNops`).
      var restored: [UInt64] = []
      var kept: [UInt64] = []
      restored.reserveCapacity(link.sites.count)
      for (index, outcome) in outcomes.enumerated() {
        if case .failed = outcome { kept.append(link.sites[index] - 8) } else { restored.append(link.sites[index] - 8) }
      }
      if globalTrampolinesIdle(state: &state, callerStack: callerStack) {
        _ = patcher.writeWords(restored.map { ($0, ZeroedPadding.nops) } + kept.map { ($0, 0) })
        ZeroedPadding.add(kept)
      } else {
        _ = patcher.writeWords((restored + kept).map { ($0, 0) })
        ZeroedPadding.add(restored + kept)
        state.multi.pendingNops.formUnion(restored)
      }
    }
    if link.viaStubs && !link.padding {
      // The stubs' record words lead into the records retired below: 0 now (a thread still in a
      // stub then looks its record up, and finds none). A stub a general function jumps to holds
      // that function's record (the publish of the commit that took it out of the link wrote it).
      let used = Set(moved)
      var words: [(address: UInt64, value: UInt64)] = []
      for stubs in link.stubBlocks {
        for stub in stride(
          from: stubs.block.address, to: stubs.block.address + UInt64(stubs.length), by: MultiStub.size)
        where !used.contains(stub) {
          words.append((stub + UInt64(MultiStub.recordOffset), 0))
        }
      }
      arena.storeWords(words)
    }
    if let records = link.records {
      // Padding readers hold the record itself; hash readers may hold the table that leads to
      // it (retired with the next publish, which the detach makes).
      if link.padding { state.reclaimer.retire(records) } else { state.multi.detachedRecords.append(records.block) }
    }
  }

  /// Whether no thread is inside a global trampoline or in a handler it called, or in a stub
  /// (about to call one): a reclaimer pass over them (it signals running threads). When none
  /// is, retired stubs no longer count (no thread can enter them again).
  private func globalTrampolinesIdle(state: inout State, callerStack: UInt64) -> Bool {
    var ranges = state.multi.trampolines.map(\.image.block.range) + state.multi.retiredStubs
    ranges += state.multi.orphanStubs.map(\.block.range) + state.multi.bulk.flatMap { $0.stubBlocks.map(\.block.range) }
    guard !ranges.isEmpty else { return true }
    guard case .success(let busy) = Reclaimer.busyRanges(ranges, callerStack: callerStack), busy.isEmpty else {
      return false
    }
    state.multi.retiredStubs = []
    return true
  }

  /// Gives each site of `link` a stub (`MultiStub`, or for a relocated link a `PrologueStub`):
  /// blocks of stubs allocated near runs of sites (one block while the sites stay within reach
  /// of it), each stub calling the link's global trampoline near it. Sites with no stub (out of
  /// memory, a copy that cannot be made there) are reported and listed in `unreachable`.
  private func placeStubs(
    _ link: inout BulkLink, key: MultiKey, unreachable: inout [Int], report: inout TransactionReport,
    state: inout State
  ) {
    var code: CodeArena.Block.Writer?
    var trampoline: UInt64 = 0
    let most = link.relocated ? PrologueStub.maximumSize : MultiStub.size
    // Where a site's branch lands in its stub.
    let entryOffset = UInt64(link.relocated ? PrologueStub.entryOffset : 0)
    func finish() {
      guard let written = code else { return }
      let full = arena.trim(written.block, to: written.count)
      link.stubBlocks.append(CodeImage(block: full, length: written.count))
      code = nil
    }
    func fail(_ index: Int, _ reason: String) {
      report.append(.init(function: link.names[index], address: link.functions[index], outcome: .failed(reason)))
      unreachable.append(index)
      link.entries.append(0)
    }
    for (index, site) in link.sites.enumerated() {
      if link.relocated, code != nil {
        let padding = min(
          code!.room, (PrologueStub.alignment - code!.count % PrologueStub.alignment) % PrologueStub.alignment)
        code!.write(count: padding) { $0.initializeMemory(as: UInt8.self, repeating: 0xcc, count: padding) }
      }
      if code == nil || code!.room < most || SiteBytes.branch(0xe9, at: site, to: code!.address + entryOffset) == nil {
        finish()
        do {
          // Room for the rest of the sites (at most a few thousand stubs a block); a block that
          // stops reaching them is cut short (`finish` gives back what it did not use).
          let fresh = try arena.allocate(near: site, size: most * min(link.sites.count - index, 4096))
          do {
            trampoline = try globalTrampoline(key: key, model: link.model, near: fresh.address, state: &state)
          } catch {
            arena.release(fresh)
            throw error
          }
          code = CodeArena.Block.Writer(fresh)
        } catch {
          fail(index, "\(error)")
          continue
        }
      }
      let stub = code!.address
      let written =
        link.relocated
        ? PrologueStub.write(
          to: &code!, function: link.functions[index], site: site, length: link.lengths[index],
          verbatim: link.verbatim[index], trampoline: trampoline)
        : MultiStub.bytes(at: stub, patch: .nop(at: site, function: link.functions[index]), trampoline: trampoline)
          .map { code!.put($0) } != nil
      guard written else {
        // The trampoline was placed near the block's start; far into a large block, place another
        // (and a relocated copy whose operands cannot reach from here stays untraced).
        finish()
        fail(
          index,
          link.relocated
            ? "its first instructions cannot be moved into its stub" : "its stub cannot reach the global trampoline")
        continue
      }
      link.entries.append(stub + entryOffset)
    }
    finish()
  }

  /// Puts the NOPs back into padding that held record pointers once no thread can be inside a
  /// global trampoline (and so about to read it). Cheap when nothing is pending.
  func restorePaddingNops(state: inout State, callerStack: UInt64) {
    guard !state.multi.pendingNops.isEmpty, globalTrampolinesIdle(state: &state, callerStack: callerStack) else {
      return
    }
    // Only words no tracer has claimed since (a claimed one may hold a record pointer now).
    let pending = ZeroedPadding.claim(all: state.multi.pendingNops.sorted())
    _ = patcher.writeWords(pending.map { ($0, ZeroedPadding.nops) })
    state.multi.pendingNops = []
  }
}

/// A bulk link's arrays while one pass over the targets decides who joins: rows appended into
/// columns of a fixed capacity (one target adds at most one row), then made into arrays (the
/// names moved, the rest copied).
/// Invariant: rows `0..<count` of every column are initialized, the rest not, but for `names`:
/// rows `0..<namesHeld` (`link` moves them out). Only `names` holds references.
private final class BulkColumns {
  private let capacity: Int
  private var count = 0
  private var namesHeld = 0
  private let targets: UnsafeMutablePointer<Int>
  private let sites: UnsafeMutablePointer<UInt64>
  private let functions: UnsafeMutablePointer<UInt64>
  private let names: UnsafeMutablePointer<String>
  private let cookies: UnsafeMutablePointer<UInt64>
  private let originals: UnsafeMutablePointer<UInt64>
  private let lengths: UnsafeMutablePointer<UInt8>
  private let verbatim: UnsafeMutablePointer<Bool>

  init(capacity: Int) {
    self.capacity = capacity
    let rows = max(1, capacity)
    (targets, names) = (.allocate(capacity: rows), .allocate(capacity: rows))
    (sites, functions, cookies, originals) = (
      .allocate(capacity: rows), .allocate(capacity: rows), .allocate(capacity: rows), .allocate(capacity: rows)
    )
    (lengths, verbatim) = (.allocate(capacity: rows), .allocate(capacity: rows))
  }

  deinit {
    names.deinitialize(count: namesHeld)
    names.deallocate()
    targets.deallocate()
    for column in [sites, functions, cookies, originals] { column.deallocate() }
    lengths.deallocate()
    verbatim.deallocate()
  }

  /// The row of target `index`.
  func append(
    _ index: Int, site: UInt64, function: UInt64, name: String, cookie: UInt64, original: UInt64, length: UInt8,
    verbatim moves: Bool
  ) {
    precondition(count < capacity, "more rows than targets")
    targets[count] = index
    sites[count] = site
    functions[count] = function
    precondition(namesHeld == count, "a row appended after its link was made")
    (names + count).initialize(to: name)
    namesHeld += 1
    cookies[count] = cookie
    originals[count] = original
    lengths[count] = length
    verbatim[count] = moves
    count += 1
  }

  var targetIndices: [Int] { Array(UnsafeBufferPointer(start: targets, count: count)) }

  /// A link of these rows (`relocated`: with their lengths and verbatim flags), their names moved
  /// into it (a copy of each, and then its release, showed). Once only.
  func link(
    id: Int, kind: HandlerKind, handler: UInt64, model: FunctionModel, padding: Bool, relocated: Bool
  ) -> BulkLink {
    func array<T>(_ column: UnsafeMutablePointer<T>) -> [T] { Array(UnsafeBufferPointer(start: column, count: count)) }
    var link = BulkLink(
      id: id, kind: kind, handler: handler, model: model, padding: padding, sites: array(sites),
      functions: array(functions), names: movedNames(), cookies: array(cookies), originals: array(originals),
      entries: [], viaStubs: kind != .entry, stubBlocks: [], records: nil, recordOffsets: [])
    if relocated {
      link.relocated = true
      link.lengths = array(lengths)
      link.verbatim = array(verbatim)
    }
    return link
  }

  private func movedNames() -> [String] {
    precondition(namesHeld == count, "the names were moved already")
    namesHeld = 0
    return [String](unsafeUninitializedCapacity: count) { buffer, initialized in
      if let base = buffer.baseAddress { base.moveInitialize(from: names, count: count) }
      initialized = count
    }
  }
}

extension MultiState {
  func bulkLink(containing site: UInt64) -> Int? {
    bulk.firstIndex { $0.index(of: site) != nil }
  }
}
