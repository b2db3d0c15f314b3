/// The readers' outputs: uftrace's replay and report, Chrome trace-event JSON, folded stacks.
public enum Render {
  /// uftrace's duration column: "   1.234 us" (us below a millisecond, then ms, then s).
  public static func duration(_ nanoseconds: Double) -> String {
    let (value, unit): (Double, String) =
      nanoseconds < 1e6
      ? (nanoseconds / 1e3, "us") : nanoseconds < 1e9 ? (nanoseconds / 1e6, "ms") : (nanoseconds / 1e9, " s")
    return fixed(value, 3).leftPadded(to: 8, with: " ") + " " + unit
  }

  public static func fixed(_ value: Double, _ digits: Int) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let rounded = (value * scale).rounded()
    let whole = Int(rounded / scale)
    let fraction = Int(abs(rounded) - Double(abs(whole)) * scale)
    let sign = rounded < 0 && whole == 0 ? "-" : ""
    return "\(sign)\(whole)." + String(fraction).leftPadded(to: digits)
  }

  /// Per-function statistics.
  public struct FunctionStatistics: Sendable, Equatable {
    public var name: String
    public var total: Double = 0
    public var selfTime: Double = 0
    public var calls = 0
    public var minimum = Double.infinity
    public var maximum = 0.0

    public init(name: String) { self.name = name }
  }

  public enum SortKey: String, CaseIterable, Sendable { case total, `self`, calls, min, max, name }

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

  public static func jsonEscape(_ text: String) -> String {
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
