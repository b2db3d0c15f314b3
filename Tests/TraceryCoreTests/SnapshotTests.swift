import CTraceryShims
import Foundation
import Synchronization
import Testing
import TraceryFixtures

@testable import TraceryCore

/// The snapshot signal and the program's sleeping system calls: a snapshot that lands in a call
/// the kernel does not restart after a handler (the reclaimer can signal a thread it saw running
/// just as it enters one) must not end it with EINTR; the program's own signals still do.
@Suite struct SnapshotTests {
  enum Call: String, CaseIterable {
    case nanosleep, poll, epollWait, select
  }

  /// Sleeps 300 ms in `call` on a thread of its own that takes both signals; once it is blocked
  /// in the call, `interrupt(tid)` runs. Returns the call's result, its errno and the
  /// milliseconds it took.
  static func sleep(in call: Call, interrupt: (Int32) -> Void) -> (result: Int32, error: Int32, milliseconds: Int) {
    let tid = Atomic<Int32>(0)
    let outcome = Mutex<(Int32, Int32, Int)?>(nil)
    let sleeper = Thread {
      tid.store(ctracery_gettid(), ordering: .releasing)
      let start = System.monotonicNanoseconds()
      var error: Int32 = 0
      let result = tracery_fixture_sleep_in(Int32(Call.allCases.firstIndex(of: call)!), 300, &error)
      let milliseconds = Int((System.monotonicNanoseconds() - start) / 1_000_000)
      outcome.withLock { $0 = (result, error, milliseconds) }
    }
    sleeper.start()
    while tid.load(ordering: .acquiring) == 0 { usleep(100) }
    let id = tid.load(ordering: .acquiring)
    // Blocked in its call (procfs says so), then interrupted.
    while Reclaimer.blockedRegisters(of: id) == nil { usleep(1_000) }
    usleep(20_000)
    interrupt(id)
    while true {
      if let done = outcome.withLock({ $0 }) { return done }
      usleep(1_000)
    }
  }

  @Test(arguments: Call.allCases)
  func aSnapshotDoesNotEndASleepingCall(_ call: Call) {
    let restarted = ctracery_calls_restarted()
    var answer: Int32 = -2
    let (result, error, milliseconds) = Self.sleep(in: call) { tid in
      var rip: UInt64 = 0
      var rsp: UInt64 = 0
      var others = [UInt64](repeating: 0, count: Int(CTRACERY_SNAPSHOT_REGISTERS))
      answer = ctracery_snapshot_thread(tid, &rip, &rsp, &others, 100, 1)
    }
    #expect(answer == 0, "the sleeping thread answered the snapshot")
    // (Interrupted, a call returns after the ~20 ms it had slept; select restarts with the time it
    // had left, so its whole sleep may round to 299 ms.)
    #expect(result == 0 && milliseconds >= 250, "\(call): result \(result), errno \(error), \(milliseconds) ms")
    #expect(ctracery_calls_restarted() > restarted)
  }

  /// A program's own handled signal ends the same calls with EINTR, as without Tracery.
  @Test(arguments: Call.allCases)
  func theProgramsOwnSignalStillEndsASleepingCall(_ call: Call) {
    let (result, error, milliseconds) = Self.sleep(in: call) { tid in
      #expect(tracery_fixture_send_program_signal(tid) == 0)
    }
    #expect(result == -1 && error == EINTR && milliseconds < 300, "\(call): result \(result), \(milliseconds) ms")
  }
}
