/// The readers' outputs: uftrace's replay and report, Chrome trace-event JSON, folded stacks.
public enum Render {
  /// uftrace's duration column: "   1.234 us" (us below a millisecond, then ms, then s).
  public static func duration(_ nanoseconds: Double) -> String {
    let (value, unit): (Double, String) =
      nanoseconds < 1e6
      ? (nanoseconds / 1e3, "us") : nanoseconds < 1e9 ? (nanoseconds / 1e6, "ms") : (nanoseconds / 1e9, " s")
    return fixed(value, 3).leftPadded(to: 8, with: " ") + " " + unit
  }

  static func fixed(_ value: Double, _ digits: Int) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let rounded = (value * scale).rounded()
    let whole = Int(rounded / scale)
    let fraction = Int(abs(rounded) - Double(abs(whole)) * scale)
    let sign = rounded < 0 && whole == 0 ? "-" : ""
    return "\(sign)\(whole)." + String(fraction).leftPadded(to: digits)
  }

  /// The call tree, threads interleaved by time, as uftrace replay prints it:
  ///
  ///     # DURATION     TID     FUNCTION
  ///                 [  1234] | main() {
  ///        1.250 us [  1234] |   fib();
  ///        5.000 us [  1234] | } /* main */
  public static func replay(_ threads: [ThreadCalls], filter: CallFilter) -> String {
    struct Line {
      let time: Double
      let order: Int
      let text: String
    }
    var lines: [Line] = []
    var order = 0
    for thread in threads {
      let tid = "[" + String(thread.tid).leftPadded(to: 6, with: " ") + "]"
      let blank = String(repeating: " ", count: 11)
      let shown = thread.visible(filter)
      let lastTime = thread.calls.map(\.end).max() ?? 0
      let shownSet = Set(shown.map(\.index))
      for (index, depth) in shown {
        let call = thread.calls[index]
        let indent = String(repeating: "  ", count: depth)
        let time = call.complete ? duration(call.duration) : blank
        let hasChildren = call.children.contains { shownSet.contains($0) }
        order += 1
        if hasChildren {
          lines.append(Line(time: call.start, order: order, text: "\(blank) \(tid) | \(indent)\(call.signature) {"))
          let closing =
            call.complete
            ? "}\(call.returnValues.isEmpty ? "" : call.returnSuffix + ";") /* \(call.label) */"
            : "} /* \(call.label): no exit recorded */"
          // A closing line sorts after every line of its subtree. A call without an exit that
          // ended when the next call at its depth started (see CallTree) closes before that
          // call's line, deeper ones first; the calls still open at the end of the trace close
          // last, innermost first (a later opening order closes earlier).
          let closedByNextCall = !call.complete && call.end < lastTime
          let closingOrder =
            closedByNextCall
            ? -1_000_000_000 - depth : call.complete ? order + 1_000_000_000 : 3_000_000_000 - order
          lines.append(Line(time: call.end, order: closingOrder, text: "\(time) \(tid) | \(indent)\(closing)"))
        } else {
          let suffix = call.complete ? "\(call.returnSuffix);" : "; /* no exit recorded */"
          lines.append(
            Line(time: call.start, order: order, text: "\(time) \(tid) | \(indent)\(call.signature)\(suffix)"))
        }
      }
    }
    lines.sort { ($0.time, $0.order) < ($1.time, $1.order) }
    var output = "# DURATION     TID     FUNCTION\n"
    for line in lines { output += line.text + "\n" }
    return output
  }

  /// Per-function statistics.
  public struct FunctionStatistics: Sendable, Equatable {
    public var name: String
    public var total: Double = 0
    public var selfTime: Double = 0
    public var calls = 0
    public var minimum = Double.infinity
    public var maximum = 0.0
  }

  public enum SortKey: String, CaseIterable, Sendable { case total, `self`, calls, min, max, name }

  /// Statistics per function, over the calls `filter` shows. Total time counts a recursive
  /// function once per outermost call. Functions are told apart by their full names: two that
  /// show the same (simple) label are two rows, each named in full.
  public static func statistics(_ threads: [ThreadCalls], filter: CallFilter) -> [FunctionStatistics] {
    var labels: [String: String] = [:]
    func collect(_ thread: ThreadCalls, into table: inout [String: FunctionStatistics]) {
      let shown = thread.visible(filter)
      let shownSet = Set(shown.map(\.index))
      for (index, _) in shown {
        let call = thread.calls[index]
        labels[call.name] = call.label
        var entry = table[call.name] ?? FunctionStatistics(name: call.label)
        let childTime = call.children.filter { shownSet.contains($0) }.reduce(0.0) { $0 + thread.calls[$1].duration }
        var ancestor = call.parent
        var recursive = false
        while let current = ancestor {
          if thread.calls[current].name == call.name {
            recursive = true
            break
          }
          ancestor = thread.calls[current].parent
        }
        if !recursive { entry.total += call.duration }
        entry.selfTime += max(0, call.duration - childTime)
        entry.calls += 1
        entry.minimum = min(entry.minimum, call.duration)
        entry.maximum = max(entry.maximum, call.duration)
        table[call.name] = entry
      }
    }
    var table: [String: FunctionStatistics] = [:]
    for thread in threads { collect(thread, into: &table) }
    var uses: [String: Int] = [:]
    for label in labels.values { uses[label, default: 0] += 1 }
    return table.map { name, entry in
      var entry = entry
      if uses[entry.name, default: 0] > 1 { entry.name = name }
      return entry
    }
  }

  public static func sorted(_ functions: [FunctionStatistics], by key: SortKey) -> [FunctionStatistics] {
    functions.sorted { a, b in
      switch key {
      case .total: return (a.total, b.name) > (b.total, a.name)
      case .self: return (a.selfTime, b.name) > (b.selfTime, a.name)
      case .calls: return (a.calls, b.name) > (b.calls, a.name)
      case .min: return (a.minimum, b.name) > (b.minimum, a.name)
      case .max: return (a.maximum, b.name) > (b.maximum, a.name)
      case .name: return a.name < b.name
      }
    }
  }

  /// uftrace report's table, with min and max.
  public static func report(_ functions: [FunctionStatistics]) -> String {
    var output = "  Total time   Self time       Calls    Min time    Max time  Function\n"
    output += "  ==========  ==========  ==========  ==========  ==========  ====================\n"
    for entry in functions {
      output +=
        "  \(duration(entry.total))  \(duration(entry.selfTime))  \(String(entry.calls).leftPadded(to: 10, with: " "))"
        + "  \(duration(entry.minimum))  \(duration(entry.maximum))  \(entry.name)\n"
    }
    return output
  }

  /// Chrome trace-event JSON (complete events, microseconds), for chrome://tracing or Perfetto,
  /// with metadata events naming each process (`processes`: pid → name) and thread.
  public static func chrome(_ threads: [ThreadCalls], filter: CallFilter, processes: [Int32: String] = [:]) -> String {
    var events: [String] = []
    for (pid, name) in processes.sorted(by: { $0.key < $1.key }) {
      events.append(
        "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":\(pid),\"args\":{\"name\":\"\(jsonEscape(name))\"}}")
    }
    for thread in threads {
      let name = thread.name.isEmpty ? "thread \(thread.tid)" : "\(thread.name) (\(thread.tid))"
      events.append(
        "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":\(thread.pid),\"tid\":\(thread.tid),"
          + "\"args\":{\"name\":\"\(jsonEscape(name))\"}}")
    }
    for thread in threads {
      for (index, _) in thread.visible(filter) {
        let call = thread.calls[index]
        // Recorded values (-A/-R) as the event's args: arg1 ... arg6, retval.
        let values = (call.arguments + call.returnValues).map { value in
          "\"\(ValueSpec.Item(source: value.source, format: value.format).name)\":\"\(jsonEscape(value.text))\""
        }
        events.append(
          "{\"name\":\"\(jsonEscape(call.label))\",\"ph\":\"X\",\"pid\":\(thread.pid),\"tid\":\(thread.tid),"
            + "\"ts\":\(fixed(call.start / 1e3, 3)),\"dur\":\(fixed(call.duration / 1e3, 3))"
            + (values.isEmpty ? "}" : ",\"args\":{\(values.joined(separator: ","))}}"))
      }
    }
    return "{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n" + events.joined(separator: ",\n") + "\n]}\n"
  }

  /// Folded stacks ("main;parse;read 1234", self nanoseconds), the input of flamegraph.pl.
  public static func folded(_ threads: [ThreadCalls], filter: CallFilter) -> String {
    var totals: [String: Double] = [:]
    var order: [String] = []
    for thread in threads {
      let shown = thread.visible(filter)
      let shownSet = Set(shown.map(\.index))
      var path: [String] = []
      for (index, depth) in shown {
        let call = thread.calls[index]
        path = Array(path.prefix(depth)) + [call.label]
        let childTime = call.children.filter { shownSet.contains($0) }.reduce(0.0) { $0 + thread.calls[$1].duration }
        let key = path.joined(separator: ";")
        if totals[key] == nil { order.append(key) }
        totals[key, default: 0] += max(0, call.duration - childTime)
      }
    }
    return order.map { "\($0) \(Int(totals[$0]!.rounded()))\n" }.joined()
  }

  static func jsonEscape(_ text: String) -> String {
    var result = ""
    for scalar in text.unicodeScalars {
      switch scalar {
      case "\"": result += "\\\""
      case "\\": result += "\\\\"
      case _ where scalar.value < 0x20: result += "\\u" + String(scalar.value, radix: 16).leftPadded(to: 4)
      default: result.unicodeScalars.append(scalar)
      }
    }
    return result
  }
}
