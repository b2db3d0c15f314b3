import CTraceryShims
import Glibc
import Testing

/// The agent defines libm's rounding functions itself (CTraceryAgent's libm.c, so that it does
/// not load libm into every traced process; the Swift runtime's Dictionary and Set sizes call
/// `ceil`): they must give what libm gives, signed zeros, halves, the edges of the exactly
/// representable range, infinities and NaN included.
@Suite struct RoundingTests {
  static let doubles: [Double] = {
    var values: [Double] = [
      0, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999999999999994, -0.49999999999999994, 1, -1,
      4_503_599_627_370_495.5, -4_503_599_627_370_495.5, 0x1p52, -0x1p52, 0x1p53 + 2, 0x1p63, -0x1p63, 1e300,
      -1e300, .infinity, -.infinity, .leastNonzeroMagnitude, -.leastNonzeroMagnitude, .greatestFiniteMagnitude,
      1.0000000000000002, 0.9999999999999999, 3.7, -3.7, 1_000_000.25, -1_000_000.75,
    ]
    // And a spread of fractions at every scale up to past 2^53.
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    for _ in 0..<20_000 {
      state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
      let scale = Double(sign: .plus, exponent: Int(state >> 58) - 4, significand: 1)
      let value = (Double(state >> 11) / Double(1 << 53) - 0.5) * scale
      values.append(value)
    }
    return values
  }()

  func same(_ a: Double, _ b: Double) -> Bool { a.bitPattern == b.bitPattern }
  func same(_ a: Float, _ b: Float) -> Bool { a.bitPattern == b.bitPattern }

  @Test func doublesRoundAsLibmRoundsThem() {
    for x in Self.doubles {
      #expect(same(ctracery_round_double(x, CTRACERY_ROUND_UP), Glibc.ceil(x)), "ceil \(x)")
      #expect(same(ctracery_round_double(x, CTRACERY_ROUND_DOWN), Glibc.floor(x)), "floor \(x)")
      #expect(same(ctracery_round_double(x, CTRACERY_ROUND_TOWARD_ZERO), Glibc.trunc(x)), "trunc \(x)")
      #expect(same(ctracery_round_double(x, CTRACERY_ROUND_NEAREST), Glibc.round(x)), "round \(x)")
    }
    #expect(ctracery_round_double(.nan, CTRACERY_ROUND_UP).isNaN)
    #expect(ctracery_round_double(-.nan, CTRACERY_ROUND_NEAREST).isNaN)
  }

  @Test func floatsRoundAsLibmRoundsThem() {
    let floats = Self.doubles.map { Float($0) } + [8_388_607.5, -8_388_607.5, 0x1p23, 0x1p31, -0x1p31, 0.49999997]
    for x in floats {
      #expect(same(ctracery_round_float(x, CTRACERY_ROUND_UP), Glibc.ceilf(x)), "ceilf \(x)")
      #expect(same(ctracery_round_float(x, CTRACERY_ROUND_DOWN), Glibc.floorf(x)), "floorf \(x)")
      #expect(same(ctracery_round_float(x, CTRACERY_ROUND_TOWARD_ZERO), Glibc.truncf(x)), "truncf \(x)")
      #expect(same(ctracery_round_float(x, CTRACERY_ROUND_NEAREST), Glibc.roundf(x)), "roundf \(x)")
    }
    #expect(ctracery_round_float(.nan, CTRACERY_ROUND_DOWN).isNaN)
  }
}
