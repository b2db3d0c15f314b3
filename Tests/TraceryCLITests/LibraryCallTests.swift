import Foundation
import Testing
import TraceryTestSupport

/// `tracery record --libcall`: the program's calls through its PLT, recorded as `NAME@plt` calls
/// (its GOT pointed at stubs of Tracery's; no code patched).
@Suite struct LibraryCallTests {
  static func build(_ name: String, in directory: URL, flags: [String] = []) throws -> String {
    try RecordCommandTests.program(name, flags: ["-O2", "-fpatchable-function-entry=5"] + flags, in: directory)
  }

  /// The replay shows each library call where the program made it, as uftrace does.
  @Test func libraryCallsAppearWhereTheProgramMadeThem() throws {
    let directory = try TestSupport.temporaryDirectory("libcall")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try Self.build("libcalls", in: directory)
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program], options: ["--libcall"])
    #expect(traced.status == 0 && traced.stdout == "14\n", "\(traced.stdout)\(traced.stderr)")
    let replay = try TestSupport.run(OptimizedProgramTests.tracery, ["replay", "-d", trace.path])
    let tree = RecordCommandTests.trees(replay.stdout).values.first ?? []
    let measure = ["  measure() {", "    strlen@plt();", "  }"]
    #expect(
      tree == ["main() {"] + measure + measure + measure
        + ["  malloc@plt();", "  snprintf@plt();", "  puts@plt();", "  free@plt();", "}"],
      "\(replay.stdout)")
    // Two processes of the same program share one file of library-call names (its sites are
    // offsets in the stubs' block, which each process's file places).
    let twice = directory.appendingPathComponent("twice")
    let both = try RecordCommandTests.record(twice, ["/bin/sh", "-c", "'\(program)'; '\(program)'"])
    #expect(both.status == 0 && both.stdout == "14\n14\n", "\(both.stderr)")
    let files = try FileManager.default.contentsOfDirectory(atPath: twice.appendingPathComponent("symbols").path)
    let processes = try FileManager.default.contentsOfDirectory(atPath: twice.path).filter { $0.hasPrefix("process-") }
    #expect(processes.count == 3 && files.filter { $0.hasPrefix("libcalls-") }.count == 2, "\(processes) \(files)")
    let counts = try RecordCommandTests.recordedCounts(twice)
    #expect(counts["snprintf@plt"] == 2 && counts["puts@plt"] == 2 && counts["measure"] == 6, "\(counts)")
    // Without --libcall, none.
    let plain = directory.appendingPathComponent("plain")
    _ = try RecordCommandTests.record(plain, [program], options: ["--no-libcall"])
    #expect(try RecordCommandTests.recordedCounts(plain).keys.allSatisfy { !$0.hasSuffix("@plt") })
  }

  /// Functions that return twice or never (setjmp, longjmp, exit) are left to the program: a
  /// program that longjmps out of traced calls and starts threads runs as untraced, and its
  /// own functions' counts are callgrind's.
  @Test func aProgramThatLongjmpsAndStartsThreadsRunsAsUntraced() throws {
    let directory = try TestSupport.temporaryDirectory("libcall-tails")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try Self.build("tails", in: directory, flags: ["-pthread"])
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program], options: ["--libcall"])
    #expect(traced.status == 0 && traced.stdout == "120\n", "\(traced.stdout)\(traced.stderr)")
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["pthread_create@plt"] == 3 && counts["pthread_join@plt"] == 3, "\(counts)")
    #expect(counts["_setjmp@plt"] == nil && counts["longjmp@plt"] == nil)
    let expected = try CorpusTests.callgrind(program, [], in: directory)
    for (name, count) in counts where !name.hasSuffix("@plt") {
      #expect(expected[name] == count, "\(name): recorded \(count), callgrind \(expected[name] ?? 0)")
    }
  }

  /// A forked child and a Swift program with async functions run as untraced under --libcall:
  /// `fork` (it returns in two processes) is left alone (traced, the child's file began with the
  /// exit of its parent's call); Swift concurrency's entry points, which async code tail-calls
  /// and which return with `ret 8`, are recorded (before the graph followed such returns, the
  /// Swift program stopped at its corrupt-shadow-stack check).
  @Test func forkIsLeftAloneAndSwiftConcurrencyIsRecorded() throws {
    let directory = try TestSupport.temporaryDirectory("libcall-fork")
    defer { try? FileManager.default.removeItem(at: directory) }
    let demo = directory.appendingPathComponent("demo").path
    try TestSupport.compile(
      compiler: "clang", sources: [RecordCommandTests.examples.appendingPathComponent("demo/demo.c").path],
      flags: ["-O1", "-fpatchable-function-entry=5", "-pthread"], output: demo)
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [demo, "7"], options: ["--libcall"])
    #expect(traced.status == 0, "\(traced.stderr)")
    let report = try TestSupport.run(OptimizedProgramTests.tracery, ["report", "-d", trace.path])
    #expect(report.stderr.isEmpty && report.stdout.contains("child_work"), "\(report.stdout)\(report.stderr)")
    #expect(report.stdout.contains("printf@plt") && !report.stdout.contains("fork@plt"))
    let swiftdemo = try RecordCommandTests.swiftDemo(in: directory)
    let swiftTrace = directory.appendingPathComponent("swift")
    let swiftRun = try RecordCommandTests.record(swiftTrace, [swiftdemo], options: ["--libcall", "--relocate"])
    #expect(swiftRun.status == 0 && swiftRun.stdout.contains("tasks 1698"), "\(swiftRun.stderr)")
    let counts = try RecordCommandTests.recordedCounts(swiftTrace)
    #expect(counts["swift_allocObject@plt", default: 0] > 0, "\(counts.keys)")
    #expect(counts["swift_task_switch@plt", default: 0] > 0, "\(counts.keys)")
  }
}
