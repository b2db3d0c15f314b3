import CTraceryShims
import Testing

@testable import TraceryCore

/// Long resolutions run in two halves at once (`Halves`): the results come back whole and in
/// order, the second half from another thread, which holds the recursion guard; a short range
/// stays on the caller's thread.
@Suite struct HalvesTests {
  @Test func aLongRangeIsDoneInTwoHalvesOnTwoThreads() {
    let me = ctracery_gettid()
    let halves = Halves.split(0..<10_000) { range in
      (items: Array(range), thread: ctracery_gettid(), guarded: ctracery_guard_value())
    }
    #expect(halves.count == 2)
    #expect(halves.flatMap(\.items) == Array(0..<10_000))
    #expect(halves[0].thread == me && halves[1].thread != me)
    #expect(halves[1].guarded == 1)
    let short = Halves.split(5..<(5 + Halves.minimum - 1)) { range in (Array(range), ctracery_gettid()) }
    #expect(short.count == 1 && short[0].0 == Array(5..<(5 + Halves.minimum - 1)) && short[0].1 == me)
  }
}
