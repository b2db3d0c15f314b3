import Foundation
import Testing
import TraceryTestSupport

/// What record writes, and how: private files, no symbolic links, and a program that records
/// into a file-size limit runs as it does untraced.
@Suite struct ReliabilityTests {
  static let tracery = ListCommandTests.tracery

  static func mode(_ path: String) -> Int {
    ((try? FileManager.default.attributesOfItem(atPath: path)[.posixPermissions]) as? Int) ?? -1
  }

  @Test func traceFilesArePrivateUnlessShared() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-modes")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.programs.appendingPathComponent("killed.c").path], in: directory)
    for (shared, directoryMode, fileMode) in [(false, 0o700, 0o600), (true, 0o755, 0o644)] {
      let trace = directory.appendingPathComponent(shared ? "shared" : "private")
      let result = try RecordCommandTests.record(trace, [program, "exit"], options: shared ? ["--shared"] : [])
      #expect(result.status == 7, "\(result.stderr)")
      #expect(Self.mode(trace.path) == directoryMode)
      #expect(Self.mode(trace.appendingPathComponent("symbols").path) == directoryMode)
      let files = try FileManager.default.subpathsOfDirectory(atPath: trace.path).filter { !$0.hasSuffix("symbols") }
      #expect(files.count >= 4)
      for file in files { #expect(Self.mode(trace.appendingPathComponent(file).path) == fileMode, "\(file)") }
    }
  }

  @Test func aSymbolicLinkOrAForeignDirectoryIsRefused() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-links")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.programs.appendingPathComponent("killed.c").path], in: directory)
    let target = directory.appendingPathComponent("elsewhere")
    try FileManager.default.createDirectory(at: target, withIntermediateDirectories: true)
    let link = directory.appendingPathComponent("link")
    try FileManager.default.createSymbolicLink(at: link, withDestinationURL: target)
    let refused = try RecordCommandTests.record(link, [program, "exit"])
    #expect(refused.status != 0 && refused.stderr.contains("is a symbolic link"), "\(refused.stderr)")
    #expect(try FileManager.default.contentsOfDirectory(atPath: target.path).isEmpty)

    // The agent alone, pointed at a directory others may write: it records nothing, says why,
    // and the program runs as it does untraced.
    let open = directory.appendingPathComponent("open")
    try FileManager.default.createDirectory(at: open, withIntermediateDirectories: true)
    chmod(open.path, 0o777)
    let agent = TestSupport.productsDirectory.appendingPathComponent("libtracery-agent.so").path
    let run = try TestSupport.run(
      program, ["exit"], environment: ["LD_PRELOAD": agent, "TRACERY_DIR": open.path])
    #expect(run.status == 7)
    #expect(run.stderr.contains("not recording"), "\(run.stderr)")
    #expect(try FileManager.default.contentsOfDirectory(atPath: open.path).isEmpty)
  }

  /// A file-size limit (RLIMIT_FSIZE, 2 MB) too small for the trace: no SIGXFSZ, the program's
  /// output and status unchanged, the events that found no room counted and reported.
  @Test func aFileSizeLimitDropsEventsNotTheProgram() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-limit")
    let demo = try RecordCommandTests.build(
      [RecordCommandTests.examples.appendingPathComponent("demo/demo.c").path], in: directory)
    let untraced = try TestSupport.run(demo, ["22"])
    let trace = directory.appendingPathComponent("trace")
    // ulimit -f counts 512-byte blocks: 2 MB, room for one 1 MiB chunk per file.
    let limited = try TestSupport.run(
      "/bin/sh", ["-c", "ulimit -f 4096; exec '\(Self.tracery)' record -d '\(trace.path)' -- '\(demo)' 22"])
    #expect(limited.status == untraced.status)
    #expect(limited.stdout == untraced.stdout)
    let report = try TestSupport.run(Self.tracery, ["report", "-d", trace.path])
    #expect(report.status == 0)
    #expect(report.stderr.contains("events were dropped"), "\(report.stderr)")
    #expect(report.stdout.contains(" fib"), "the first chunk's events are there")
  }
}
