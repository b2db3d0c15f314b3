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
    let start = System.monotonicNanoseconds()
    let startTicks = ctracery_rdtsc()
    while System.monotonicNanoseconds() - start < 10_000_000 {}
    let ticks = Double(ctracery_rdtsc() - startTicks)
    let nanoseconds = Double(System.monotonicNanoseconds() - start)
    return max(ticks / nanoseconds, 1e-3)
  }()

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
