import Foundation
import Testing
import TraceryTestSupport

/// The test harness itself: a process that hangs is killed with what it started, so one hung
/// traced program fails its test instead of holding the suite until CI's limit.
@Suite struct TestSupportTests {
  @Test func aHungProcessTreeIsKilledAtItsTimeout() throws {
    let directory = try TestSupport.temporaryDirectory("watchdog")
    defer { try? FileManager.default.removeItem(at: directory) }
    let pidFile = directory.appendingPathComponent("grandchild").path
    let marker = "tracery-watchdog-\(getpid())"
    let started = Date()
    // A shell whose background grandchild (named by the marker, its pid written down) keeps the
    // pipes open, both sleeping far past the timeout.
    let result = try TestSupport.run(
      "/bin/bash", ["-c", "exec -a \(marker) sleep 300 & echo $! > \(pidFile); sleep 300"], timeout: 1)
    let elapsed = Date().timeIntervalSince(started)
    #expect(elapsed < 30, "returned after \(elapsed) s")
    #expect(result.status != 0)
    #expect(result.stderr.contains("ran past 1.0 s"), "\(result.stderr)")
    let grandchild = try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(
      in: .whitespacesAndNewlines)
    #expect(Int32(grandchild) != nil, "the grandchild never started")
    usleep(200_000)
    let command = (try? String(contentsOfFile: "/proc/\(grandchild)/cmdline", encoding: .utf8)) ?? ""
    #expect(!command.hasPrefix(marker), "the grandchild \(grandchild) still runs")
  }

  @Test func aQuickProcessIsLeftAlone() throws {
    let result = try TestSupport.run("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"], timeout: 60)
    #expect(result.status == 3 && result.stdout == "out\n" && result.stderr == "err\n")
  }
}
