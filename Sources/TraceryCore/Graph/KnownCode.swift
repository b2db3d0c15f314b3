import CTraceryShims
import TraceryELF

/// The code a function-graph call may come from and still be traced: a JIT's code reads the
/// return addresses of its own calls (V8 walks its frames at every garbage collection and
/// throw, and dies on a return address that is not its code's — node under `tracery record`,
/// uftrace issue 1035), so a call from code that is not known is left untraced, its return
/// address as the caller pushed it.
///
/// Known: every executable mapping with a name (an object's text, the vDSO) and the arena's
/// slabs (memfds, not known otherwise: a JIT may double-map its code so), but `excluded` (a
/// JIT's code inside the program's file: V8's embedded builtins, which no call frame
/// describes, `Tracer.foreignRun`); not known: anonymous executable memory (a JIT's code). The
/// graph entry (`GraphEmitter`, when given the table's word) compares the caller's return
/// address with the program's text inline (`fast`), then with each range of the table.
///
/// Layout of a table: [low, high) pairs of words, then a (0, 0) pair; published whole by a
/// release store of its address into `word` (never changed in place). A table lives in an arena
/// block and is retired through the reclaimer like a multi-attach table: a thread scanning one
/// holds a pointer into it in a register, which the reclaimer's look sees.
///
/// Protocol: built and published under the tracer's lock; the graph entry reads it on any thread.
struct KnownCode {
  /// Where the graph entry finds the current table (0: none yet, every call traced).
  /// Allocated once per tracer that traces so, never freed: graph images embed its address.
  let word: UnsafeMutablePointer<UInt64>
  /// The named executable mappings of the last look at `/proc/self/maps`.
  var objects: [Range<UInt64>]
  var excluded: Range<UInt64>?
  /// An address of the program's text: its range leads the table.
  let first: UInt64
  /// The mapping holding `first` (less `excluded`), which graph entries compare inline: the
  /// program's text, mapped for the process's life (one mapping, not merged with neighbours
  /// that may go).
  var fast: Range<UInt64>
  /// The arena slabs the published table covers.
  var slabs = 0
  var table: CodeImage?

  init(objects: [Range<UInt64>], excluded: Range<UInt64>?, first: UInt64) {
    word = .allocate(capacity: 1)
    word.initialize(to: 0)
    self.objects = objects
    self.excluded = excluded
    self.first = first
    fast = Self.fast(objects, excluding: excluded, first: first)
  }

  /// The piece of the one range of `objects` holding `first` that `excluded` leaves it in
  /// (empty when none holds it).
  static func fast(_ objects: [Range<UInt64>], excluding excluded: Range<UInt64>?, first: UInt64) -> Range<UInt64> {
    guard let mapping = objects.first(where: { $0.contains(first) }) else { return 0..<0 }
    return ranges([mapping], excluding: excluded, first: first).first { $0.contains(first) } ?? 0..<0
  }

  /// The named executable regions of `map`.
  static func objects(in map: MemoryMap) -> [Range<UInt64>] {
    map.regions.filter { $0.executable && $0.named }.map { $0.start..<$0.end }
  }

  /// The table's ranges: `ranges` merged where they touch or overlap, `excluded` cut out, the
  /// range holding `first` first, the rest by address.
  static func ranges(_ ranges: [Range<UInt64>], excluding excluded: Range<UInt64>?, first: UInt64) -> [Range<UInt64>] {
    var merged: [Range<UInt64>] = []
    for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) where !range.isEmpty {
      if let last = merged.last, range.lowerBound <= last.upperBound {
        merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, range.upperBound)
      } else {
        merged.append(range)
      }
    }
    var cut: [Range<UInt64>] = []
    for range in merged {
      guard let excluded, excluded.overlaps(range) else {
        cut.append(range)
        continue
      }
      if range.lowerBound < excluded.lowerBound { cut.append(range.lowerBound..<excluded.lowerBound) }
      if excluded.upperBound < range.upperBound { cut.append(excluded.upperBound..<range.upperBound) }
    }
    if let lead = cut.firstIndex(where: { $0.contains(first) }) { cut.insert(cut.remove(at: lead), at: 0) }
    return cut
  }
}

extension Tracer {
  /// The largest run of consecutive functions of `table`'s object `object` that no call frame
  /// describes (`EntryPoints.unframed`): a JIT's code built into the program (node's 2,182 V8
  /// builtins, ~2 MB), which walks its own frames like the code it compiles. nil when there is
  /// none worth excluding: under `foreignRunMinimum` bytes (a few hand-written functions), or
  /// when most of the object's functions lack a frame (one built without call frames is not
  /// foreign).
  /// Reads the object's entry points (cached: the relocating start has them).
  static func foreignRun(in table: SymbolTable, object: Int) -> Range<UInt64>? {
    guard
      let points = EntryPoints.of(path: table.objects[object].path, bias: table.objects[object].bias),
      !points.unframed.isEmpty
    else { return nil }
    var best: Range<UInt64>?
    var run: Range<UInt64>?
    var functions = 0
    var unframed = 0
    func close() {
      if let current = run, current.count > best?.count ?? 0 { best = current }
      run = nil
    }
    for function in table.functions where function.object == object && function.size > 0 {
      functions += 1
      if points.lacksFrame(function.address) {
        unframed += 1
        let end = function.address + function.size
        run = run.map { $0.lowerBound..<max($0.upperBound, end) } ?? function.address..<end
      } else {
        close()
      }
    }
    close()
    guard let best, best.count >= foreignRunMinimum, 2 * unframed <= functions else { return nil }
    return best
  }

  /// The smallest run of unframed functions `foreignRun` excludes.
  static let foreignRunMinimum = 64 << 10

  /// From now on, function-graph calls are traced only when they come from known code
  /// (`KnownCode`): every named executable mapping but the foreign run (`foreignRun`) of the
  /// object at `sweptProgram` (a path as `ProcessObjects` lists it: one whose entry points are
  /// swept anyway, as a relocating start does; nil: none cut out). For a process that may run a
  /// JIT (the agent turns it on for every recorded program). Graph images made before keep
  /// tracing every call: turn it on before the first graph attach. `first`: an address of the
  /// program's text, whose mapping graph entries compare inline (decided by the first call: a
  /// later one publishes the table again with `excluded` cut out, but images compare the
  /// mapping as they were made). Reads `/proc/self/maps` (or the pinned map,
  /// `MemoryMap.fixed`).
  public func traceGraphCallsOnlyFromKnownCode(excludingForeignRunOf sweptProgram: String?, first: UInt64) {
    let table = sweptProgram.map { _ in symbols }
    let excluded = table.flatMap { table in
      table.objects.firstIndex { $0.path == sweptProgram }.flatMap { Self.foreignRun(in: table, object: $0) }
    }
    traceGraphCallsOnlyFromKnownCode(excluding: excluded, first: first)
  }

  /// `traceGraphCallsOnlyFromKnownCode(excludingForeignRunOf:first:)` with the run to cut out.
  func traceGraphCallsOnlyFromKnownCode(excluding excluded: Range<UInt64>?, first: UInt64) {
    let objects = KnownCode.objects(in: MemoryMap.current())
    state.withLock { state in
      if state.knownCode == nil {
        state.knownCode = KnownCode(objects: objects, excluded: excluded, first: first)
      } else {
        state.knownCode!.objects = objects
        state.knownCode!.excluded = excluded
      }
      publishKnownCode(state: &state)
    }
  }

  /// Looks at the mappings again (objects were loaded or unloaded) and publishes the table
  /// anew when they changed. Nothing when the tracer does not trace so.
  public func refreshKnownCode() {
    guard state.withLock({ $0.knownCode != nil }) else { return }
    let objects = KnownCode.objects(in: MemoryMap.current())
    state.withLock { state in
      guard state.knownCode != nil, state.knownCode!.objects != objects else { return }
      state.knownCode!.objects = objects
      publishKnownCode(state: &state)
    }
  }

  /// The current table's word (0 when calls are traced from anywhere) and the range compared
  /// inline: for `GraphEmitter`.
  func knownCode(state: borrowing State) -> (word: UInt64, fast: Range<UInt64>) {
    state.knownCode.map { (UInt64(UInt(bitPattern: $0.word)), $0.fast) } ?? (0, 0..<0)
  }

  /// Publishes the table again when the arena mapped a slab since (its code may call traced
  /// functions: library-call stubs, relocated copies). Before a patch batch makes new code live.
  func publishKnownCodeIfSlabsChanged(state: inout State) {
    if let known = state.knownCode, known.slabs != arena.slabRanges.count { publishKnownCode(state: &state) }
  }

  /// Builds and publishes the table; retires the one before. A table that cannot be allocated
  /// leaves the one before (or none: every call traced) in place.
  private func publishKnownCode(state: inout State) {
    guard var known = state.knownCode else { return }
    var slabs = arena.slabRanges
    var ranges = KnownCode.ranges(known.objects + slabs, excluding: known.excluded, first: known.first)
    // The graph entry's scan needs one range at least (the arena's slab, if nothing else).
    guard !ranges.isEmpty else { return }
    // Room for one more range: the table's own block may need a new slab.
    let capacity = 2 * (ranges.count + 2)
    guard let block = try? arena.allocate(near: known.first, size: 8 * capacity) else { return }
    if arena.slabRanges.count != slabs.count {
      slabs = arena.slabRanges
      ranges = KnownCode.ranges(known.objects + slabs, excluding: known.excluded, first: known.first)
    }
    precondition(2 * (ranges.count + 1) <= capacity, "one new slab adds at most one range")
    let words = block.words(count: capacity)
    for (index, range) in ranges.enumerated() {
      words[2 * index] = range.lowerBound
      words[2 * index + 1] = range.upperBound
    }
    words[2 * ranges.count] = 0
    words[2 * ranges.count + 1] = 0
    ctracery_store_release(known.word, block.address)
    if let old = known.table { state.reclaimer.retire(old) }
    known.table = CodeImage(block: block, length: 8 * capacity)
    known.slabs = slabs.count
    state.knownCode = known
  }
}
