import Testing

@testable import TraceryCore

/// The counter's rate as `tracery record` measures it and passes it to every process: read by a
/// plain decimal parse, to the value `Double(String)` reads (exactly up to 15 digits, within one
/// unit in the last place beyond: two roundings).
@Suite struct TimeStampCounterTests {
  @Test func aRateWrittenByStringReadsBackAsItWas() {
    #expect("2.45".withCString { TimeStampCounter.decimal($0) } == 2.45)
    for rate in [2.45, 2.4500123456789, 1.0, 3.0e-3, 0.5, 1234.5678, 2.9999999999999996, 1.0 / 3.0] {
      let text = String(rate)
      let read = text.withCString { TimeStampCounter.decimal($0) } ?? 0
      #expect(abs(read - rate) <= rate.ulp, "\(text): \(read)")
    }
    // Other forms: through Double(String), or nothing.
    #expect("1e-3".withCString { TimeStampCounter.decimal($0) } == 1e-3)
    #expect("".withCString { TimeStampCounter.decimal($0) } == nil)
    #expect("2.4x".withCString { TimeStampCounter.decimal($0) } == nil)
    #expect("1.2.3".withCString { TimeStampCounter.decimal($0) } == nil)
  }

  /// Two measurements of the rate, each across at least its span, agree (the clock and counter
  /// pairs are taken at their narrowest: a preemption inside one does not count as time).
  @Test func aCalibrationAcrossTheCallersWorkAgreesWithAnother() {
    let started = System.monotonicNanoseconds()
    let one = TimeStampCounter.Calibration()
    let first = one.rate(over: 3_000_000)
    #expect(System.monotonicNanoseconds() - started >= 3_000_000)
    let second = TimeStampCounter.Calibration().rate(over: 3_000_000)
    #expect(first > 0.01 && abs(first - second) / second < 1e-3, "\(first) \(second)")
  }
}

/// The xsave layout as `tracery record` passes it to every process (`XState.environmentKey`):
/// taken only when it is the process's own, else the processor is asked again.
@Suite struct XStateTests {
  @Test func theEnvironmentsLayoutIsTakenOnlyWhenTheProcessorHasIt() throws {
    let own = XState.current
    try #require(own.size > 0, "no xsave on this machine")
    let given = try #require(XState(environment: XState.environmentValue))
    #expect(given.components == own.components && given.size == own.size)
    // Other components than the kernel enabled, a size no xsave has, none, or not two numbers.
    for text in [
      "\(own.components ^ 4) \(own.size)", "\(own.components) 64", "\(own.components) 100000", "\(own.components) 0",
      "\(own.components)", "x \(own.size)", "",
    ] {
      #expect(XState(environment: text) == nil, "\(text)")
    }
  }
}
