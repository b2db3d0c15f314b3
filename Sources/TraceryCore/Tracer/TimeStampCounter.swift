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
    if let text = getenv(environmentKey).map({ String(cString: $0) }), let rate = Double(text), rate > 0 {
      return rate
    }
    let start = System.monotonicNanoseconds()
    let startTicks = ctracery_rdtsc()
    while System.monotonicNanoseconds() - start < 10_000_000 {}
    let ticks = Double(ctracery_rdtsc() - startTicks)
    let nanoseconds = Double(System.monotonicNanoseconds() - start)
    return max(ticks / nanoseconds, 1e-3)
  }()
}
