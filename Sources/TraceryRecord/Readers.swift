/// The readers' outputs, computed in one pass over the merged events (`TraceStream`): memory
/// grows with call depth and the number of threads (and, for the report, the number of distinct
/// functions), not with the trace.

/// A function's names: its symbol, its demangled name in full (what filters match), and the name
/// the reader shows (`Demangler.Style`).
public struct FunctionNames: Sendable {
  public let symbol: String
  public let full: String
  public let label: String

  public init(symbol: String, full: String, label: String) {
    self.symbol = symbol
    self.full = full
    self.label = label
  }
}

/// How readers name sites: (session, site) → names.
public typealias SiteNamer = (_ session: String, _ site: UInt64) -> FunctionNames

/// Each distinct function a reader meets gets a small number, once: calls carry the number, and
/// the names (and the bytes replay writes for them) are looked up by it, so nothing per event
/// hashes or copies a string.
final class NameTable {
  private let namer: SiteNamer
  private let sessions: [String]
  private var bySite: [[UInt64: Int32]]
  private var bySymbol: [String: Int32] = [:]
  private(set) var names: [FunctionNames] = []
  /// `label`, and `label()`, as bytes.
  private(set) var labels: [[UInt8]] = []
  private(set) var signatures: [[UInt8]] = []

  /// `sessions[i]`: the session of the reader's thread i.
  init(namer: @escaping SiteNamer, sessions: [String]) {
    self.namer = namer
    self.sessions = sessions
    bySite = Array(repeating: [:], count: sessions.count)
  }

  /// A direct-mapped cache in front of `bySite`: (thread, site) → index.
  private var recent = [(thread: Int, site: UInt64, index: Int32)](repeating: (-1, 0, 0), count: 4096)

  func index(thread: Int, site: UInt64) -> Int32 {
    let slot = Int(truncatingIfNeeded: (site ^ UInt64(thread) &* 0x9e37_79b9_7f4a_7c15) >> 20) & 4095
    if recent[slot].site == site, recent[slot].thread == thread { return recent[slot].index }
    let found = lookup(thread: thread, site: site)
    recent[slot] = (thread, site, found)
    return found
  }

  private func lookup(thread: Int, site: UInt64) -> Int32 {
    if let known = bySite[thread][site] { return known }
    let names = namer(sessions[thread], site)
    let index: Int32
    if let known = bySymbol[names.symbol] {
      index = known
    } else {
      index = Int32(self.names.count)
      bySymbol[names.symbol] = index
      self.names.append(names)
      labels.append(Array(names.label.utf8))
      signatures.append(Array((names.label + "()").utf8))
    }
    bySite[thread][site] = index
    return index
  }

  subscript(_ index: Int32) -> FunctionNames { names[Int(index)] }
}

/// One open call as a reader tracks it.
struct OpenCall {
  let name: Int32
  /// Its depth in the thread (a fork child's first calls start deeper).
  let depth: Int
  let start: Double
  var arguments: [RecordedValue]
  /// This call and its subtree are not shown (-N, below -D, or shorter than -t).
  var hidden = false
  /// Where it is shown: its indentation and its shown root's (-D counts from there); nil when not
  /// shown (outside every -F subtree).
  var place: (depth: Int, root: Int)?
  /// Durations of its shown children (for self times).
  var childTime = 0.0
  /// Replay: its "name() {" line was written (it has shown children).
  var opened = false

  init(name: Int32, depth: Int, start: Double, arguments: [RecordedValue]) {
    self.name = name
    self.depth = depth
    self.start = start
    self.arguments = arguments
  }
}

/// The filters as a reader applies them while streaming; name matches cached per function.
struct FilterState {
  let filter: CallFilter
  private var hidden: [Int8] = []
  private var chosen: [Int8] = []

  init(_ filter: CallFilter) { self.filter = filter }

  private static func cached(
    _ cache: inout [Int8], _ name: Int32, _ names: NameTable, _ matchers: [NameMatcher]
  ) -> Bool {
    let index = Int(name)
    if index >= cache.count { cache += [Int8](repeating: -1, count: index + 1 - cache.count) }
    if cache[index] < 0 { cache[index] = matchers.contains { $0.matchesFunction(names[name].full) } ? 1 : 0 }
    return cache[index] == 1
  }

  mutating func isHidden(_ name: Int32, _ names: NameTable) -> Bool {
    !filter.hide.isEmpty && Self.cached(&hidden, name, names, filter.hide)
  }

  mutating func isChosen(_ name: Int32, _ names: NameTable) -> Bool {
    Self.cached(&chosen, name, names, filter.only)
  }

  /// Where a call is shown given its parent, and whether it (and its subtree) is hidden; -t is
  /// left to the caller (it needs the call's duration).
  mutating func place(_ call: inout OpenCall, parent: OpenCall?, names: NameTable) {
    if parent?.hidden == true || isHidden(call.name, names) {
      call.hidden = true
      return
    }
    var place: (depth: Int, root: Int)?
    if let above = parent?.place {
      place = (above.depth + 1, above.root)
    } else if filter.only.isEmpty {
      // Unfiltered, a root keeps its depth (a fork child's calls nest in its parent's).
      place = (call.depth, call.depth)
    } else if isChosen(call.name, names) {
      place = (0, 0)
    }
    if let shown = place, let limit = filter.depth, shown.depth - shown.root >= limit {
      call.hidden = true
      return
    }
    call.place = place
  }
}

/// One thread's open calls, as events arrive: entries open calls (after closing those an entry
/// shows ended without an exit), exits close them. Calls are closed one at a time from the top,
/// so that each closing call's parent is still open.
struct CallStack {
  var calls: [OpenCall] = []
  /// The depth of calls[0]: 0, except in a fork child (see `OpenCall.depth`).
  var base = 0

  /// How many calls (from the top) an entry at `depth` shows ended without an exit (longjmp).
  func endedCount(beforeEntryAt depth: Int) -> Int { min(calls.count, max(0, base + calls.count - depth)) }

  mutating func open(_ call: OpenCall) {
    if calls.isEmpty { base = call.depth }
    calls.append(call)
  }

  /// What an exit at `depth` closes: how many calls from the top ended without an exit, and
  /// whether the next one is the call that exits. No exit when no call is open, or when the exit
  /// is above the first open call (a frame this file never saw enter: every open call ended).
  func exitPlan(depth: Int) -> (withoutExit: Int, exits: Bool) {
    guard !calls.isEmpty else { return (0, false) }
    let target = min(depth - base, calls.count - 1)
    guard target >= 0 else { return (calls.count, false) }
    return (calls.count - 1 - target, true)
  }
}

public enum Readers {
  /// The call tree, threads interleaved by time, as uftrace replay prints it:
  ///
  ///     # DURATION     TID     FUNCTION
  ///                 [  1234] | main() {
  ///        1.250 us [  1234] |   fib();
  ///        5.000 us [  1234] | } /* main */
  ///
  /// A call is written on one line when it shows no child; deciding that, and -t, reads ahead in
  /// its own thread (`TraceStream.lookahead`), never buffering other threads' lines. Returns the
  /// damage found.
  public static func replay(
    _ trace: Trace, threads: [ThreadFile], filter: CallFilter, names namer: @escaping SiteNamer, output: ByteOutput
  ) -> [Damage] {
    var stream = TraceStream(trace, threads: threads)
    var stacks = [CallStack](repeating: CallStack(), count: threads.count)
    var filters = FilterState(filter)
    let names = NameTable(namer: namer, sessions: threads.map(\.session))
    let tids = threads.map { Array(" [\(String($0.tid).leftPadded(to: 6, with: " "))] | ".utf8) }
    output.append("# DURATION     TID     FUNCTION\n")

    func begin(_ thread: Int, _ duration: Double?, _ call: OpenCall) {
      if let duration { output.duration(duration) } else { output.spaces(11) }
      output.append(tids[thread])
      output.spaces(2 * (call.place?.depth ?? 0))
    }
    func signature(_ call: OpenCall) {
      if call.arguments.isEmpty {
        output.append(names.signatures[Int(call.name)])
      } else {
        output.append(
          "\(Demangler.withoutParameters(names[call.name].label))(\(call.arguments.map(\.text).joined(separator: ", ")))"
        )
      }
    }
    func values(_ values: [RecordedValue]) {
      guard !values.isEmpty else { return }
      output.append(" = " + values.map(\.text).joined(separator: ", "))
    }
    func endedWithoutExit(_ thread: Int, _ call: OpenCall) {
      guard call.place != nil, call.opened else { return }
      begin(thread, nil, call)
      output.append("} /* ")
      output.append(names.labels[Int(call.name)])
      output.append(": no exit recorded */\n")
    }

    while let item = stream.next() {
      switch item {
      case .end(let thread, _):
        while let call = stacks[thread].calls.popLast() { endedWithoutExit(thread, call) }
      case .event(let thread, let event, let time) where event.kind == .entry:
        for _ in 0..<stacks[thread].endedCount(beforeEntryAt: event.depth) {
          endedWithoutExit(thread, stacks[thread].calls.removeLast())
        }
        var call = OpenCall(
          name: names.index(thread: thread, site: event.site), depth: event.depth, start: time,
          arguments: event.values)
        filters.place(&call, parent: stacks[thread].calls.last, names: names)
        if call.place != nil, let threshold = filter.threshold,
          let duration = ownDuration(stream.lookahead(thread), depth: event.depth, start: time),
          duration < threshold
        {
          call.hidden = true
          call.place = nil
        }
        if call.place != nil {
          let (child, exit) = firstShownChild(
            stream.lookahead(thread), of: call, filters: &filters,
            hidden: { names.index(thread: thread, site: $0) }, names: names)
          if child {
            call.opened = true
            begin(thread, nil, call)
            signature(call)
            output.append(" {\n")
          } else if let exit {
            begin(thread, exit.time - time, call)
            signature(call)
            values(exit.values)
            output.append(";\n")
          } else {
            begin(thread, nil, call)
            signature(call)
            output.append("; /* no exit recorded */\n")
          }
        }
        stacks[thread].open(call)
      case .event(let thread, let event, let time):
        let plan = stacks[thread].exitPlan(depth: event.depth)
        for _ in 0..<plan.withoutExit { endedWithoutExit(thread, stacks[thread].calls.removeLast()) }
        if plan.exits {
          let call = stacks[thread].calls.removeLast()
          if call.place != nil, call.opened {
            begin(thread, time - call.start, call)
            output.append("}")
            if !event.values.isEmpty {
              values(event.values)
              output.append(";")
            }
            output.append(" /* ")
            output.append(names.labels[Int(call.name)])
            output.append(" */\n")
          }
        }
      }
    }
    output.flush()
    return stream.damage
  }

  /// The duration of the call at `depth` that started at `start`, from the events after its
  /// entry; nil when it ended without an exit.
  static func ownDuration(_ events: TraceStream.Lookahead, depth: Int, start: Double) -> Double? {
    var events = events
    while let (event, time) = events.next() {
      switch event.kind {
      case .exit where event.depth == depth: return time - start
      case .exit where event.depth < depth: return nil
      case .entry where event.depth <= depth: return nil
      default: continue
      }
    }
    return nil
  }

  /// Whether `call` will show a child (its direct children: not hidden by -N, within -D, and,
  /// with -t, long enough or without an exit), and its exit when it shows none.
  static func firstShownChild(
    _ events: TraceStream.Lookahead, of call: OpenCall, filters: inout FilterState, hidden index: (UInt64) -> Int32,
    names: NameTable
  ) -> (shown: Bool, exit: (time: Double, values: [RecordedValue])?) {
    var events = events
    let childDepth = call.depth + 1
    // A child that may be shown once its duration is known (-t).
    var pending: Double?
    let childPlace = (call.place?.depth ?? 0) + 1 - (call.place?.root ?? 0)
    let cutByDepth = filters.filter.depth.map { childPlace >= $0 } ?? false
    while let (event, time) = events.next() {
      switch event.kind {
      case .exit where event.depth == call.depth:
        return pending != nil ? (true, nil) : (false, (time, event.values))
      case .exit where event.depth < call.depth:
        return (pending != nil, nil)
      case .exit where event.depth == childDepth:
        if let start = pending, let threshold = filters.filter.threshold, time - start >= threshold {
          return (true, nil)
        }
        pending = nil
      case .entry where event.depth <= call.depth:
        return (pending != nil, nil)
      case .entry where event.depth == childDepth:
        if pending != nil { return (true, nil) }
        guard !cutByDepth, !filters.isHidden(index(event.site), names) else { continue }
        guard filters.filter.threshold != nil else { return (true, nil) }
        pending = time
      default:
        continue
      }
    }
    return (pending != nil, nil)
  }

  /// One shown call as it ends (`walk`).
  struct Ended {
    let thread: Int
    let call: OpenCall
    let end: Double
    let complete: Bool
    let returnValues: [RecordedValue]
    /// A call of the same function encloses it.
    let recursive: Bool
  }

  /// Walks every call with the filters applied and gives each shown one as it ends, with the
  /// open calls above it (`path`); -t is applied there (a call shorter than it is not given,
  /// and neither is its subtree, whose calls are shorter still).
  static func walk(
    _ trace: Trace, threads: [ThreadFile], filter: CallFilter, names: NameTable,
    shown: (_ ended: Ended, _ path: [OpenCall]) -> Void
  ) -> [Damage] {
    var stream = TraceStream(trace, threads: threads)
    var stacks = [CallStack](repeating: CallStack(), count: threads.count)
    // Per thread: how many calls of each function are open (recursion), by name index.
    var open = [[Int32]](repeating: [], count: threads.count)
    var filters = FilterState(filter)
    func close(_ thread: Int, _ call: OpenCall, at end: Double, complete: Bool, values: [RecordedValue]) {
      open[thread][Int(call.name)] -= 1
      let depth = open[thread][Int(call.name)]
      let duration = end - call.start
      guard call.place != nil, !complete || filter.threshold.map({ duration >= $0 }) ?? true else { return }
      if let last = stacks[thread].calls.indices.last, stacks[thread].calls[last].place != nil {
        stacks[thread].calls[last].childTime += duration
      }
      shown(
        Ended(
          thread: thread, call: call, end: end, complete: complete, returnValues: values, recursive: depth > 0),
        stacks[thread].calls)
    }
    while let item = stream.next() {
      switch item {
      case .end(let thread, let time):
        while let call = stacks[thread].calls.popLast() { close(thread, call, at: time, complete: false, values: []) }
      case .event(let thread, let event, let time) where event.kind == .entry:
        for _ in 0..<stacks[thread].endedCount(beforeEntryAt: event.depth) {
          close(thread, stacks[thread].calls.removeLast(), at: time, complete: false, values: [])
        }
        var call = OpenCall(
          name: names.index(thread: thread, site: event.site), depth: event.depth, start: time,
          arguments: event.values)
        filters.place(&call, parent: stacks[thread].calls.last, names: names)
        let name = Int(call.name)
        if name >= open[thread].count { open[thread] += [Int32](repeating: 0, count: name + 1 - open[thread].count) }
        open[thread][name] += 1
        stacks[thread].open(call)
      case .event(let thread, let event, let time):
        let plan = stacks[thread].exitPlan(depth: event.depth)
        for _ in 0..<plan.withoutExit {
          close(thread, stacks[thread].calls.removeLast(), at: time, complete: false, values: [])
        }
        if plan.exits {
          close(thread, stacks[thread].calls.removeLast(), at: time, complete: true, values: event.values)
        }
      }
    }
    return stream.damage
  }

  /// Per-function statistics over the calls the filter shows (per thread when `perThread`):
  /// functions are told apart by their symbols; two that show the same label are named in full.
  /// Total time counts a recursive function once per outermost call.
  public static func statistics(
    _ trace: Trace, threads: [ThreadFile], filter: CallFilter, names namer: @escaping SiteNamer, perThread: Bool
  ) -> (tables: [(thread: ThreadFile?, rows: [Render.FunctionStatistics])], damage: [Damage]) {
    let names = NameTable(namer: namer, sessions: threads.map(\.session))
    // Per table (one, or one per thread), per name index: times and counts.
    struct Row {
      var total = 0.0, selfTime = 0.0, calls = 0, minimum = Double.infinity, maximum = 0.0
    }
    var tables = [[Row]](repeating: [], count: perThread ? threads.count : 1)
    let damage = walk(trace, threads: threads, filter: filter, names: names) { ended, _ in
      let key = perThread ? ended.thread : 0
      let call = ended.call
      let name = Int(call.name)
      if name >= tables[key].count { tables[key] += [Row](repeating: Row(), count: name + 1 - tables[key].count) }
      let duration = ended.end - call.start
      if !ended.recursive { tables[key][name].total += duration }
      tables[key][name].selfTime += max(0, duration - call.childTime)
      tables[key][name].calls += 1
      tables[key][name].minimum = min(tables[key][name].minimum, duration)
      tables[key][name].maximum = max(tables[key][name].maximum, duration)
    }
    let result = tables.indices.map { key -> (thread: ThreadFile?, rows: [Render.FunctionStatistics]) in
      let used = tables[key].indices.filter { tables[key][$0].calls > 0 }
      var uses: [String: Int] = [:]
      for name in used { uses[names[Int32(name)].label, default: 0] += 1 }
      let rows = used.map { name -> Render.FunctionStatistics in
        let row = tables[key][name]
        let label = names[Int32(name)].label
        var statistics = Render.FunctionStatistics(name: uses[label, default: 0] > 1 ? names[Int32(name)].full : label)
        statistics.total = row.total
        statistics.selfTime = row.selfTime
        statistics.calls = row.calls
        statistics.minimum = row.minimum
        statistics.maximum = row.maximum
        return statistics
      }
      return (perThread ? threads[key] : nil, rows)
    }
    return (result, damage)
  }

  /// Chrome trace-event JSON (complete events, microseconds), for chrome://tracing or Perfetto,
  /// with metadata events naming each process (`processes`: pid → name) and thread.
  public static func chrome(
    _ trace: Trace, threads: [ThreadFile], filter: CallFilter, names namer: @escaping SiteNamer,
    processes: [Int32: String], output: ByteOutput
  ) -> [Damage] {
    let names = NameTable(namer: namer, sessions: threads.map(\.session))
    output.append("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n")
    var first = true
    func event(_ text: String) {
      output.append(first ? text : ",\n" + text)
      first = false
    }
    for (pid, name) in processes.sorted(by: { $0.key < $1.key }) {
      event(
        "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":\(pid),\"args\":{\"name\":\"\(Render.jsonEscape(name))\"}}")
    }
    for thread in threads {
      let name = thread.name.isEmpty ? "thread \(thread.tid)" : "\(thread.name) (\(thread.tid))"
      event(
        "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":\(thread.pid),\"tid\":\(thread.tid),"
          + "\"args\":{\"name\":\"\(Render.jsonEscape(name))\"}}")
    }
    let prefixes = threads.map { Array(",\"ph\":\"X\",\"pid\":\($0.pid),\"tid\":\($0.tid),\"ts\":".utf8) }
    var quoted: [Int32: [UInt8]] = [:]
    let damage = walk(trace, threads: threads, filter: filter, names: names) { ended, _ in
      let call = ended.call
      let name =
        quoted[call.name]
        ?? {
          let bytes = Array("{\"name\":\"\(Render.jsonEscape(names[call.name].label))\"".utf8)
          quoted[call.name] = bytes
          return bytes
        }()
      if !first { output.append(",\n") }
      first = false
      output.append(name)
      output.append(prefixes[ended.thread])
      output.microseconds(call.start)
      output.append(",\"dur\":")
      output.microseconds(ended.end - call.start)
      // Recorded values (-A/-R) as the event's args: arg1 ... arg6, fparg1 ..., retval.
      let values = (call.arguments + ended.returnValues).map { value in
        "\"\(ValueSpec.Item(source: value.source, format: value.format).name)\":\"\(Render.jsonEscape(value.text))\""
      }
      output.append(values.isEmpty ? "}" : ",\"args\":{\(values.joined(separator: ","))}}")
    }
    output.append("\n]}\n")
    output.flush()
    return damage
  }

  /// Folded stacks ("main;parse;read 1234", self nanoseconds), the input of flamegraph.pl: one
  /// line per distinct shown stack, in the order they first end.
  public static func folded(
    _ trace: Trace, threads: [ThreadFile], filter: CallFilter, names namer: @escaping SiteNamer
  ) -> (lines: [String], damage: [Damage]) {
    let names = NameTable(namer: namer, sessions: threads.map(\.session))
    var totals: [[Int32]: Double] = [:]
    var order: [[Int32]] = []
    let damage = walk(trace, threads: threads, filter: filter, names: names) { ended, path in
      let key = path.filter { $0.place != nil }.map(\.name) + [ended.call.name]
      if totals[key] == nil { order.append(key) }
      totals[key, default: 0] += max(0, ended.end - ended.call.start - ended.call.childTime)
    }
    let lines = order.map { key in
      key.map { names[$0].label }.joined(separator: ";") + " \(Int(totals[key]!.rounded()))"
    }
    return (lines, damage)
  }
}

extension ByteOutput {
  /// Nanoseconds as microseconds with three decimals ("12.345"), as Chrome JSON wants them.
  func microseconds(_ nanoseconds: Double) {
    let rounded = Int(nanoseconds.rounded())
    if rounded < 0 { byte(0x2d) }
    decimal(abs(rounded) / 1000)
    byte(0x2e)
    let fraction = abs(rounded) % 1000
    byte(UInt8(48 + fraction / 100))
    byte(UInt8(48 + fraction / 10 % 10))
    byte(UInt8(48 + fraction % 10))
  }
}
