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

/// How readers name sites: (session, site) → names. Callers cache (see the CLI's Symbolizer).
public typealias SiteNamer = (_ session: String, _ site: UInt64) -> FunctionNames

/// One open call as a reader tracks it.
struct OpenCall {
  let names: FunctionNames
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
  /// Replay: its "name() {" line was written (it has shown children), or its one-line form.
  var opened = false

  init(names: FunctionNames, depth: Int, start: Double, arguments: [RecordedValue]) {
    self.names = names
    self.depth = depth
    self.start = start
    self.arguments = arguments
  }

  /// `name(arguments)` as uftrace shows it; recorded arguments take the place of a C++ name's
  /// parameter types (`middle(1)` rather than `middle(int)(1)`).
  var signature: String {
    guard !arguments.isEmpty else { return names.label + "()" }
    return "\(Demangler.withoutParameters(names.label))(\(arguments.map(\.text).joined(separator: ", ")))"
  }
}

/// The filters as a reader applies them while streaming; name matches cached per name.
struct FilterState {
  let filter: CallFilter
  private var hiddenNames: [String: Bool] = [:]
  private var chosenNames: [String: Bool] = [:]

  init(_ filter: CallFilter) { self.filter = filter }

  mutating func isHidden(_ name: String) -> Bool {
    guard !filter.hide.isEmpty else { return false }
    if let known = hiddenNames[name] { return known }
    let found = filter.hide.contains { $0.matchesFunction(name) }
    hiddenNames[name] = found
    return found
  }

  mutating func isChosen(_ name: String) -> Bool {
    if let known = chosenNames[name] { return known }
    let found = filter.only.contains { $0.matchesFunction(name) }
    chosenNames[name] = found
    return found
  }

  /// Where a call is shown given its parent, and whether it (and its subtree) is hidden; -t is
  /// left to the caller (it needs the call's duration).
  mutating func place(_ call: inout OpenCall, parent: OpenCall?) {
    if parent?.hidden == true || isHidden(call.names.full) {
      call.hidden = true
      return
    }
    var place: (depth: Int, root: Int)?
    if let above = parent?.place {
      place = (above.depth + 1, above.root)
    } else if filter.only.isEmpty {
      // Unfiltered, a root keeps its depth (a fork child's calls nest in its parent's).
      place = (call.depth, call.depth)
    } else if isChosen(call.names.full) {
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
  /// The call tree, threads interleaved by time, as uftrace replay prints it, written line by
  /// line through `write`:
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
    _ trace: Trace, threads: [ThreadFile], filter: CallFilter, names: SiteNamer, write: (String) -> Void
  ) -> [Damage] {
    var stream = TraceStream(trace, threads: threads)
    var stacks = [CallStack](repeating: CallStack(), count: threads.count)
    var filters = FilterState(filter)
    let blank = String(repeating: " ", count: 11)
    let tids = threads.map { "[" + String($0.tid).leftPadded(to: 6, with: " ") + "]" }
    write("# DURATION     TID     FUNCTION\n")

    func line(_ thread: Int, _ time: String, _ call: OpenCall, _ text: String) {
      let indent = String(repeating: "  ", count: call.place?.depth ?? 0)
      write("\(time) \(tids[thread]) | \(indent)\(text)\n")
    }
    func endedWithoutExit(_ thread: Int, _ call: OpenCall) {
      guard call.place != nil, call.opened else { return }
      line(thread, blank, call, "} /* \(call.names.label): no exit recorded */")
    }
    func returnSuffix(_ values: [RecordedValue]) -> String {
      values.isEmpty ? "" : " = " + values.map(\.text).joined(separator: ", ")
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
          names: names(threads[thread].session, event.site), depth: event.depth, start: time,
          arguments: event.values)
        filters.place(&call, parent: stacks[thread].calls.last)
        if call.place != nil, let threshold = filter.threshold,
          let duration = ownDuration(stream.lookahead(thread), depth: event.depth, start: time),
          duration < threshold
        {
          call.hidden = true
          call.place = nil
        }
        if call.place != nil {
          let (child, exit) = firstShownChild(
            stream.lookahead(thread), of: call, filters: &filters, names: { names(threads[thread].session, $0) })
          if child {
            call.opened = true
            line(thread, blank, call, "\(call.signature) {")
          } else if let exit {
            line(thread, Render.duration(exit.time - time), call, "\(call.signature)\(returnSuffix(exit.values));")
          } else {
            line(thread, blank, call, "\(call.signature); /* no exit recorded */")
          }
        }
        stacks[thread].open(call)
      case .event(let thread, let event, let time):
        let plan = stacks[thread].exitPlan(depth: event.depth)
        for _ in 0..<plan.withoutExit { endedWithoutExit(thread, stacks[thread].calls.removeLast()) }
        if plan.exits {
          let call = stacks[thread].calls.removeLast()
          if call.place != nil, call.opened {
            let suffix = event.values.isEmpty ? "" : returnSuffix(event.values) + ";"
            line(thread, Render.duration(time - call.start), call, "}\(suffix) /* \(call.names.label) */")
          }
        }
      }
    }
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
    _ events: TraceStream.Lookahead, of call: OpenCall, filters: inout FilterState, names: (UInt64) -> FunctionNames
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
        guard !cutByDepth, !filters.isHidden(names(event.site).full) else { continue }
        guard filters.filter.threshold != nil else { return (true, nil) }
        pending = time
      default:
        continue
      }
    }
    return (pending != nil, nil)
  }

  /// Walks every call with the filters applied and gives each shown one, when it ends, with its
  /// duration, whether its exit was recorded, its self time, its return values and whether a
  /// call of the same function encloses it (recursion); -t is applied there (a call shorter than
  /// it is not given, and neither is its subtree, whose calls are shorter still).
  static func walk(
    _ trace: Trace, threads: [ThreadFile], filter: CallFilter, names: SiteNamer,
    shown: (
      _ thread: Int, _ call: OpenCall, _ path: [OpenCall], _ end: Double, _ complete: Bool,
      _ returnValues: [RecordedValue], _ recursive: Bool
    ) -> Void
  ) -> [Damage] {
    var stream = TraceStream(trace, threads: threads)
    var stacks = [CallStack](repeating: CallStack(), count: threads.count)
    var open = [[String: Int]](repeating: [:], count: threads.count)
    var filters = FilterState(filter)
    func close(_ thread: Int, _ call: OpenCall, at end: Double, complete: Bool, values: [RecordedValue]) {
      open[thread][call.names.full, default: 1] -= 1
      let duration = end - call.start
      guard call.place != nil, !complete || filter.threshold.map({ duration >= $0 }) ?? true else { return }
      if let last = stacks[thread].calls.indices.last, stacks[thread].calls[last].place != nil {
        stacks[thread].calls[last].childTime += duration
      }
      shown(thread, call, stacks[thread].calls, end, complete, values, open[thread][call.names.full, default: 0] > 0)
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
          names: names(threads[thread].session, event.site), depth: event.depth, start: time,
          arguments: event.values)
        filters.place(&call, parent: stacks[thread].calls.last)
        open[thread][call.names.full, default: 0] += 1
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
  /// functions are told apart by their full names; two that show the same label are named in
  /// full. Total time counts a recursive function once per outermost call.
  public static func statistics(
    _ trace: Trace, threads: [ThreadFile], filter: CallFilter, names: SiteNamer, perThread: Bool
  ) -> (tables: [(thread: ThreadFile?, rows: [Render.FunctionStatistics])], damage: [Damage]) {
    var tables: [Int: [String: Render.FunctionStatistics]] = [:]
    var labels: [Int: [String: String]] = [:]
    let damage = walk(trace, threads: threads, filter: filter, names: names) {
      thread, call, _, end, _, _, recursive in
      let key = perThread ? thread : -1
      let duration = end - call.start
      var row = tables[key]?[call.names.full] ?? Render.FunctionStatistics(name: call.names.label)
      if !recursive { row.total += duration }
      row.selfTime += max(0, duration - call.childTime)
      row.calls += 1
      row.minimum = min(row.minimum, duration)
      row.maximum = max(row.maximum, duration)
      tables[key, default: [:]][call.names.full] = row
      labels[key, default: [:]][call.names.full] = call.names.label
    }
    let keys = perThread ? Array(threads.indices) : [-1]
    let result = keys.map { key -> (thread: ThreadFile?, rows: [Render.FunctionStatistics]) in
      var uses: [String: Int] = [:]
      for label in (labels[key] ?? [:]).values { uses[label, default: 0] += 1 }
      let rows = (tables[key] ?? [:]).map { name, row in
        var row = row
        if uses[row.name, default: 0] > 1 { row.name = name }
        return row
      }
      return (perThread ? threads[key] : nil, rows)
    }
    return (result, damage)
  }

  /// Chrome trace-event JSON (complete events, microseconds), for chrome://tracing or Perfetto,
  /// with metadata events naming each process (`processes`: pid → name) and thread, written
  /// through `write`.
  public static func chrome(
    _ trace: Trace, threads: [ThreadFile], filter: CallFilter, names: SiteNamer, processes: [Int32: String],
    write: (String) -> Void
  ) -> [Damage] {
    write("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n")
    var first = true
    func event(_ text: String) {
      write(first ? text : ",\n" + text)
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
    let damage = walk(trace, threads: threads, filter: filter, names: names) {
      thread, call, _, end, _, returnValues, _ in
      // Recorded values (-A/-R) as the event's args: arg1 ... arg6, fparg1 ..., retval.
      let values = (call.arguments + returnValues).map { value in
        "\"\(ValueSpec.Item(source: value.source, format: value.format).name)\":\"\(Render.jsonEscape(value.text))\""
      }
      event(
        "{\"name\":\"\(Render.jsonEscape(call.names.label))\",\"ph\":\"X\",\"pid\":\(threads[thread].pid),"
          + "\"tid\":\(threads[thread].tid),\"ts\":\(Render.fixed(call.start / 1e3, 3)),"
          + "\"dur\":\(Render.fixed((end - call.start) / 1e3, 3))"
          + (values.isEmpty ? "}" : ",\"args\":{\(values.joined(separator: ","))}}"))
    }
    write("\n]}\n")
    return damage
  }

  /// Folded stacks ("main;parse;read 1234", self nanoseconds), the input of flamegraph.pl: one
  /// line per distinct shown stack, in the order they first end.
  public static func folded(
    _ trace: Trace, threads: [ThreadFile], filter: CallFilter, names: SiteNamer
  ) -> (lines: [String], damage: [Damage]) {
    var totals: [String: Double] = [:]
    var order: [String] = []
    let damage = walk(trace, threads: threads, filter: filter, names: names) {
      _, call, path, end, _, _, _ in
      let key = (path.filter { $0.place != nil }.map(\.names.label) + [call.names.label]).joined(separator: ";")
      if totals[key] == nil { order.append(key) }
      totals[key, default: 0] += max(0, end - call.start - call.childTime)
    }
    return (order.map { "\($0) \(Int(totals[$0]!.rounded()))" }, damage)
  }
}
