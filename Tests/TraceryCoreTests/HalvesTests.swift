import CTraceryShims
import Foundation
import Synchronization
import Testing

@testable import TraceryCore

/// Long resolutions are shared by two threads (`Halves`): each takes the next piece until none is
/// left; the results come back whole and in order, one per piece; pieces the other thread ran
/// ran with the recursion guard held; a short range stays on the caller's thread.
@Suite struct HalvesTests {
  @Test func aLongRangeIsSharedByTwoThreadsInPieces() {
    let me = ctracery_gettid()
    let count = 5 * Halves.piece + 7
    // Each thread's pieces wait (up to 60 s in all, by the clock) until the other thread has
    // taken one: both threads then surely take part, whatever the scheduler does. Seen in CI
    // when only the caller's waited: the new thread ran first on the caller's core and took all
    // six pieces (microseconds) before the caller took its first.
    let took = Atomic<Int>(0)  // bit 0: the caller took a piece; bit 1: the other thread did
    let deadline = Date().addingTimeInterval(60)
    let pieces = Halves.split(0..<count) { range in
      let thread = ctracery_gettid()
      took.bitwiseOr(thread == me ? 1 : 2, ordering: .acquiringAndReleasing)
      while took.load(ordering: .acquiring) != 3 && Date() < deadline { usleep(1000) }
      return (items: Array(range), thread: thread, guarded: ctracery_guard_value())
    }
    #expect(pieces.count == 6)
    #expect(pieces.flatMap(\.items) == Array(0..<count))
    #expect(pieces.dropLast().allSatisfy { $0.items.count == Halves.piece })
    #expect(Set(pieces.map(\.thread)).count == 2)
    #expect(pieces.contains { $0.thread == me })
    #expect(pieces.filter { $0.thread != me }.allSatisfy { $0.guarded == 1 })
    let short = Halves.split(5..<(5 + Halves.minimum - 1)) { range in (Array(range), ctracery_gettid()) }
    #expect(short.count == 1 && short[0].0 == Array(5..<(5 + Halves.minimum - 1)) && short[0].1 == me)
  }

  /// `joined` moves every piece's elements into one array, in order; a piece's `Output` keeps
  /// (and frees) only what was not moved.
  @Test func piecesOutputsAreMovedIntoOneArrayInOrder() {
    let count = 3 * Halves.piece + 5
    let pieces = Halves.split(0..<count) { range in
      let output = Halves.Output<String>(capacity: range.count)
      // Every third item left out, as a resolve leaves out what it refuses; heap strings, so a
      // lost or doubled element would show as a wrong value or a crash.
      for item in range where item % 3 != 0 { output.append(String(repeating: "x", count: 20) + "\(item)") }
      return output
    }
    let joined = Halves.joined(pieces) { $0 }
    #expect(joined == (0..<count).filter { $0 % 3 != 0 }.map { String(repeating: "x", count: 20) + "\($0)" })
    #expect(pieces.allSatisfy { $0.count == 0 })
  }
}
