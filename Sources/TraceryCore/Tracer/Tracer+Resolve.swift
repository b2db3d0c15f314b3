import CTraceryShims
import TraceryELF
import TraceryX86

extension Tracer {
  // MARK: - Resolution

  func resolve(_ selector: FunctionSelector) throws(AttachError) -> [Target] {
    var refused = TransactionReport()
    return try resolve(selector, refused: &refused)
  }

  /// `refused`: functions of an `.addresses` selector that no site could be made for, and why
  /// (the other selectors throw when a function they name has none).
  func resolve(_ selector: FunctionSelector, refused: inout TransactionReport) throws(AttachError) -> [Target] {
    let (known, bulk, relocates, trapSites, trapSiteObjects) = state.withLock { state in
      var known: [UInt64: Target] = [:]
      for function in state.functions.values {
        let target = Target(patch: function.patch, name: function.name)
        known[function.function] = target
        known[function.site] = target
      }
      return (
        known, state.multi.bulk, state.relocatesPrologues, state.usesTrapSites, state.trapSiteObjects
      )
    }
    let context = ResolveContext(
      map: MemoryMap.current(), known: known, bulk: bulk,
      relocate: relocates && Self.threadsCanBeMoved(), trap: relocates, trapSites: trapSites,
      trapSiteObjects: trapSiteObjects, table: relocates ? symbols : nil)
    switch selector {
    case .address(let address):
      var hint = 0
      return [try context.target(at: address, name: nil, hint: &hint)]
    case .addresses(let addresses):
      let table = symbols
      let plain = context.known.isEmpty && context.bulk.isEmpty
      // By two threads at once when long and relocating (`Halves`): a relocating start of a
      // large program decides tens of thousands. (Each piece but the first has a context of its
      // own: `forAnotherThread`.)
      let halves = Halves.split(addresses.indices, if: context.relocate) {
        range -> (targets: Halves.Output<Target>, refused: TransactionReport) in
        let context = range.lowerBound == 0 ? context : context.forAnotherThread()
        let result = Halves.Output<Target>(capacity: range.count)
        var refusals = TransactionReport()
        var previous: Int?
        var hint = 0
        for address in addresses[range] {
          previous = table.function(containing: address, after: previous)
          let name = previous.map { table.functions[$0].name }
          // The common case inline (this loop runs per function of a 50,000-function attach): an
          // untraced function whose entry is a 5-byte NOP.
          if plain, let name, context.map.isExecutable(address, count: 9, hint: &hint),
            SiteBytes(reading: address).isNop5
          {
            result.append(Target(patch: .nop(at: address), name: name))
          } else {
            do throws(AttachError) {
              result.append(try context.target(at: address, name: name, index: previous, hint: &hint))
            } catch {
              let reason: String
              if case .noPatchSite(_, let why) = error { reason = why } else { reason = "\(error)" }
              refusals.append(
                .init(
                  function: name ?? "0x\(String(address, radix: 16))", address: address, outcome: .failed(reason)))
            }
          }
        }
        return (result, refusals)
      }
      let result = Halves.joined(halves) { $0.targets }
      for half in halves { refused.append(contentsOf: half.refused) }
      guard !result.isEmpty else { throw .noFunctionMatches("any of \(addresses.count) addresses") }
      return result
    case .name(let name):
      return try targets(matching: name, context) { table in table.functions(named: name) }
    case .glob(let pattern):
      let glob: Glob
      do { glob = try Glob(pattern) } catch { throw .invalidPattern("\(error)") }
      return try targets(matching: "'\(pattern)'", context) { table in table.functions(matching: glob) }
    }
  }

  /// Whether the patcher can likely see every other thread out of a prologue it relocates
  /// (`TextPatcher.moveThreadsOut`): none of them is running with the snapshot signal blocked
  /// (it would be polled for ~100 ms, then the relocation abandoned for an int3). Functions are
  /// given trap sites at once otherwise. A thread running the SIGTRAP handler blocks the signal
  /// for microseconds and answers a snapshot as the handler ends (`Reclaimer.snapshot`).
  public static func threadsCanBeMoved() -> Bool {
    let me = ctracery_gettid()
    return Reclaimer.threadIDs().allSatisfy { tid in
      tid == me || !Reclaimer.blocksSnapshotSignal(tid) || Reclaimer.blockedRegisters(of: tid) != nil
        || Reclaimer.snapshot(of: tid) != nil
    }
  }

  private func targets(
    matching what: String, _ context: ResolveContext, _ select: (SymbolTable) -> [Int]
  ) throws(AttachError) -> [Target] {
    let table = symbols
    let chosen = context.trap ? select(table) : select(table).filter { table.functions[$0].site != nil }
    guard !chosen.isEmpty else { throw .noFunctionMatches(what) }
    // By two threads at once when long and relocating (`Halves`): deciding 50,000 relocations
    // took ~7 ms on one.
    let halves = Halves.split(chosen.indices, if: context.relocate) {
      range -> (targets: Halves.Output<Target>, error: AttachError?) in
      let context = range.lowerBound == 0 ? context : context.forAnotherThread()
      let result = Halves.Output<Target>(capacity: range.count)
      var hint = 0
      for index in chosen[range] {
        // (Fields read in place: a copy of each function's entry, name and all, showed.)
        guard let site = table.functions[index].site else {
          // Relocating: every function of the pattern, without a NOP site; those that cannot be
          // moved are left out (an attach reports what it could not attach only by address).
          if let target = try? context.target(
            at: table.functions[index].address, name: table.functions[index].name, index: index, hint: &hint)
          {
            result.append(target)
          }
          continue
        }
        do throws(AttachError) {
          result.append(
            try context.target(
              at: site, name: table.functions[index].name, entry: table.functions[index].address, hint: &hint))
        } catch {
          return (result, error)
        }
      }
      return (result, nil)
    }
    // The first function that has no site, in order, as when one thread went through them all.
    if let error = halves.lazy.compactMap({ $0.error }).first { throw error }
    let result = Halves.joined(halves) { $0.targets }
    guard !result.isEmpty else { throw .noFunctionMatches(what) }
    return result
  }

  /// Builds the symbol table from the loaded objects `include` accepts only (e.g. those that
  /// record patch sites: `ELFFile.recordsPatchSites`), instead of every loaded object. A process
  /// that traces only patchable code need not read the C library or the Swift runtime (each
  /// agent start read ~20 MB of objects that have no sites). Functions of the objects left out
  /// are then unknown by name.
  /// `unnamed`: objects whose functions no symbol names are added too (a stripped program's, from
  /// its call frames), named `FILE+0xADDRESS`: for `relocatesPrologues`.
  public func loadSymbols(
    including include: (ProcessObjects.Entry) -> Bool, unnamed: (ProcessObjects.Entry) -> Bool = { _ in false }
  ) {
    let table = ProcessObjects.symbolTable(including: include, unnamed: unnamed).table
    state.withLock { $0.symbols = table }
  }

  /// The symbol table of the loaded objects: built on first use and kept (`reloadSymbols()`
  /// after `dlopen`).
  public var symbols: SymbolTable {
    state.withLock { state in
      if state.symbols == nil { state.symbols = ProcessObjects.symbolTable().table }
      return state.symbols!
    }
  }

  /// What resolving one selector reads once: the memory map and the functions already traced.
  struct ResolveContext {
    let map: MemoryMap
    let known: [UInt64: Target]
    let bulk: [BulkLink]
    /// Whether a function without a NOP gets a relocated site, else a trap site
    /// (`Tracer.relocatesPrologues` both), and the symbol table that gives its size.
    let relocate: Bool
    let trap: Bool
    /// Whether the fallback may be a trap site (`Tracer.usesTrapSites`): else such a function is
    /// refused.
    let trapSites: Bool
    /// `Tracer.trapSiteObjects`.
    let trapSiteObjects: Set<String>?
    let table: SymbolTable?
    /// The last object's entry points: functions come in address order, so most lookups are for
    /// the object before (a cache keyed by path and bias string per function was ~2% of a
    /// relocating start of cc1). One thread's: `forAnotherThread`.
    var objectEntryPoints = LastObjectEntryPoints()

    /// The same context for another thread resolving at the same time (`Halves`): all it holds
    /// is read only, but its cache.
    func forAnotherThread() -> ResolveContext {
      var copy = self
      copy.objectEntryPoints = LastObjectEntryPoints(ownHints: true)
      return copy
    }

    /// The site of the function at `address` (`PatchSite.at`), or the one it has already.
    /// `tableIndex`: its index in the symbol table, when the caller knows it. `hint`: see
    /// `MemoryMap.isExecutable(_:count:hint:)`.
    func target(
      at address: UInt64, name: String?, entry: UInt64? = nil, index tableIndex: Int? = nil, hint: inout Int
    ) throws(AttachError) -> Target {
      if !known.isEmpty, let known = known[address] { return known }
      for link in bulk {
        // A bulk function's site is its entry, or 4 bytes on (after endbr64).
        if let index = link.index(of: address) ?? link.index(of: address + 4),
          link.functions[index] == address
            || link.sites[index] == address
        {
          return Target(patch: link.patch(index), name: link.names[index])
        }
      }
      let label = name ?? "0x\(String(address, radix: 16))"
      guard map.isExecutable(address, count: 9, hint: &hint) else {
        throw .noPatchSite(function: label, reason: "not in readable executable memory")
      }
      if let patch = PatchSite.nopSite(at: address, function: entry) { return Target(patch: patch, name: label) }
      // Why it has no NOP site: made only when reported (most plain functions are relocated).
      func notNop() -> String { PatchSite.nopRefusal(at: address).reason }
      guard trap, let table, let index = tableIndex ?? table.function(containing: address),
        table.functions[index].address == address, table.functions[index].size > 0
      else { throw .noPatchSite(function: label, reason: notNop()) }
      let size = Int(table.functions[index].size)
      var notRelocated = "relocation is off"
      if relocate {
        let entryPoints = objectEntryPoints.of(table.functions[index].object, in: table)
        // Neither moved nor trapped: its calls and returns may not be a function's.
        if entryPoints?.lacksFrame(address) == true {
          throw .noPatchSite(function: label, reason: "\(notNop()); \(PatchSiteError.Category.unframed)")
        }
        if let patch = entryPoints?.decidedSite(address, size: size) { return Target(patch: patch, name: label) }
        do {
          let patch = try PatchSite.relocated(
            at: address, function: address, size: size,
            span: Tracer.paddingSpan(after: index, in: table, map: map, hint: &hint), entryPoints: entryPoints)
          return Target(patch: patch, name: label)
        } catch let refusal {
          notRelocated = refusal.reason
        }
      }
      guard trapSites else {
        throw .noPatchSite(
          function: label, reason: "\(notNop()); not relocated: \(notRelocated); int3 sites are off")
      }
      if let trapSiteObjects, !trapSiteObjects.contains(table.objects[table.functions[index].object].path) {
        throw .noPatchSite(
          function: label,
          reason: "\(notNop()); not relocated: \(notRelocated); no int3 sites in its object")
      }
      do {
        return Target(patch: try PatchSite.trap(at: address, function: address, size: size), name: label)
      } catch let refusal {
        throw .noPatchSite(
          function: label, reason: "\(notNop()); not relocated: \(notRelocated); \(refusal.reason)")
      }
    }
  }

  /// `EntryPoints.of` for one object of a symbol table, remembered for the next function of the
  /// same object. Used by one resolve, on one thread.
  final class LastObjectEntryPoints {
    private var object = -1
    private var points: EntryPoints?
    /// Whether its entry points keep search hints of their own (`EntryPoints.withOwnHints`): for
    /// the pieces of a resolve shared by two threads (`Halves`) but the first.
    private let ownHints: Bool

    init(ownHints: Bool = false) { self.ownHints = ownHints }

    func of(_ object: Int, in table: SymbolTable) -> EntryPoints? {
      if object != self.object {
        self.object = object
        points = EntryPoints.of(path: table.objects[object].path, bias: table.objects[object].bias)
        if ownHints { points = points?.withOwnHints() }
      }
      return points
    }
  }

  /// For a function shorter than the branch (and an `endbr64`), the bytes from its entry that
  /// its relocation may read (`PatchSite.surveySpan`: up to where the next function starts),
  /// when they are all mapped executable; else nil.
  private static func paddingSpan(after index: Int, in table: SymbolTable, map: MemoryMap, hint: inout Int) -> Int? {
    // (Fields read in place: a copy of the function's entry per function showed.)
    let (address, size) = (table.functions[index].address, table.functions[index].size)
    let span = PatchSite.surveySpan(size: size, to: table.nextStart(after: index), from: address)
    guard span > size, map.isExecutable(address, count: UInt64(span), hint: &hint) else { return nil }
    return span
  }

  func functions(of link: Link) -> [UInt64] {
    state.withLock { state in
      state.functions.values.filter { $0.attachments.contains { $0.link.id == link.id } }.map(\.function).sorted()
    }
  }
}
