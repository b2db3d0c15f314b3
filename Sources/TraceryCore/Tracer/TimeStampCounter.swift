import CTraceryShims

#if canImport(Glibc)
  import Glibc
#endif

/// The time-stamp counter's rate, measured once against the monotonic clock (10 ms).
public enum TimeStampCounter {
  /// The counter now.
  public static var now: UInt64 { ctracery_rdtsc() }

  /// The environment variable that carries a measured rate to the processes a tool starts.
  public static let environmentKey = "TRACERY_TICKS_PER_NS"

  /// The counter's rate: from `environmentKey` when set (`tracery record` measures it once
  /// for every process it starts: measuring takes 10 ms), else measured now.
  public static let ticksPerNanosecond: Double = {
    if let text = getenv(environmentKey), let rate = decimal(text), rate > 0 { return rate }
    return Calibration().rate(over: 10_000_000)
  }()

  /// A measurement of the counter's rate across whatever its owner does between making it and
  /// asking for the rate, waiting out the rest of the span asked for: `tracery record` measures
  /// across its own start (its checks and files take a few milliseconds) instead of spinning
  /// 10 ms, a fifth of recording a short program. Each end is the counter read between two
  /// clock reads, the narrowest of a few tries (a preemption between the two reads of a single
  /// pair would be counted as time): over 5 ms, the rate to ~1e-5.
  public struct Calibration: Sendable {
    private let start: (nanoseconds: UInt64, ticks: UInt64)

    public init() { start = Self.reading() }

    /// The rate since `init`, over at least `span` nanoseconds.
    public func rate(over span: UInt64 = 5_000_000) -> Double {
      while System.monotonicNanoseconds() &- start.nanoseconds < span {}
      let end = Self.reading()
      return max(Double(end.ticks &- start.ticks) / Double(end.nanoseconds &- start.nanoseconds), 1e-3)
    }

    /// The clock's time and the counter read at it.
    private static func reading() -> (nanoseconds: UInt64, ticks: UInt64) {
      var best: (nanoseconds: UInt64, ticks: UInt64, width: UInt64) = (0, 0, .max)
      for _ in 0..<5 {
        let before = System.monotonicNanoseconds()
        let ticks = ctracery_rdtsc()
        let after = System.monotonicNanoseconds()
        if after &- before < best.width { best = (before + (after &- before) / 2, ticks, after &- before) }
      }
      return (best.nanoseconds, best.ticks)
    }
  }

  /// `text` as written by `String(Double)` for a rate (digits, a point, digits), read without
  /// the runtime's `strtod`: its first use in a traced process cost ~60 µs of every child's start
  /// (first-touch faults of the locale code). Another form goes to `Double(String)`.
  static func decimal(_ text: UnsafePointer<CChar>) -> Double? {
    var mantissa: UInt64 = 0
    var scale = 1.0
    var digits = 0
    var point = false
    var cursor = text
    while cursor.pointee != 0 {
      let character = UInt8(bitPattern: cursor.pointee)
      cursor += 1
      if character == UInt8(ascii: "."), !point {
        point = true
      } else if (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(character), digits < 18 {
        mantissa = mantissa * 10 + UInt64(character - UInt8(ascii: "0"))
        digits += 1
        if point { scale *= 10 }
      } else {
        return Double(String(cString: text))
      }
    }
    return digits > 0 ? Double(mantissa) / scale : nil
  }
}
