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
          // call's line, deeper ones first; one still open at the end of the trace, last.
          let closedByNextCall = !call.complete && call.end < lastTime
          let closingOrder = closedByNextCall ? -1_000_000_000 - depth : order + 1_000_000_000
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

  /// Statistics per function (per thread too when `perThread`), over the calls `filter` shows.
  /// Total time counts a recursive function once per outermost call.
  public static func statistics(_ threads: [ThreadCalls], filter: CallFilter) -> [FunctionStatistics] {
    func collect(_ thread: ThreadCalls, into table: inout [String: FunctionStatistics]) {
      let shown = thread.visible(filter)
      let shownSet = Set(shown.map(\.index))
      for (index, _) in shown {
        let call = thread.calls[index]
        var entry = table[call.label] ?? FunctionStatistics(name: call.label)
        let childTime = call.children.filter { shownSet.contains($0) }.reduce(0.0) { $0 + thread.calls[$1].duration }
        var ancestor = call.parent
        var recursive = false
        while let current = ancestor {
          if thread.calls[current].label == call.label {
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
        table[call.label] = entry
      }
    }
    var table: [String: FunctionStatistics] = [:]
    for thread in threads { collect(thread, into: &table) }
    return Array(table.values)
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

  /// Chrome trace-event JSON (complete events, microseconds), for chrome://tracing or Perfetto.
  public static func chrome(_ threads: [ThreadCalls], filter: CallFilter) -> String {
    var events: [String] = []
    for thread in threads {
      for (index, _) in thread.visible(filter) {
        let call = thread.calls[index]
        // Recorded values (-A/-R) as the event's args: arg1 ... arg6, retval.
        let values = (call.arguments + call.returnValues).map { value in
          "\"\(value.source == 0 ? "retval" : "arg\(value.source)")\":\"\(jsonEscape(value.text))\""
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
