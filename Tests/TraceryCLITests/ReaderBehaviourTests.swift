import Foundation
import Testing
import TraceryTestSupport

/// What a uftrace user expects of the readers and of `record`'s checks, on the demo and on C++
/// names that simple demangling could confuse.
@Suite struct ReaderBehaviourTests {
  static let tracery = ListCommandTests.tracery

  /// The demo recorded once per test run with the README's -A/-R examples.
  static let demo: Result<(trace: URL, directory: URL), any Error> = Result {
    let directory = try TestSupport.temporaryDirectory("reader-demo")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.examples.appendingPathComponent("demo/demo.c").path], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let options = [
      "-A", "fib@arg1", "-R", "fib@retval", "-A", "report@arg1/s,arg2/x", "-R", "parse_number@retval/d32",
      "-R", "average@retval/f",
    ]
    let recorded = try RecordCommandTests.record(trace, [program, "6"], options: options)
    guard recorded.status == 0 else { throw TestSupport.CompileError(description: recorded.stderr) }
    return (trace, directory)
  }

  func run(_ arguments: [String]) throws -> TestSupport.ProcessResult {
    try TestSupport.run(Self.tracery, arguments)
  }

  @Test func theReadmeValueExamplesShowWhatTheySay() throws {
    let trace = try Self.demo.get().trace
    let replay = try run(["replay", "-d", trace.path])
    #expect(replay.status == 0 && replay.stderr.isEmpty, "\(replay.stderr)")
    for line in ["report(\"fib\", 0x8);", "parse_number() = 1;", "average() = 10.25;", "fib(6) {", "} = 8; /* fib */"] {
      #expect(replay.stdout.contains(line), "\(line)")
    }
  }

  @Test func patternsMatchAsUftraceMatchesThem() throws {
    let trace = try Self.demo.get().trace
    // A regular expression is searched for in the name; a plain name is matched exactly.
    let dist = try run(["replay", "-d", trace.path, "-F", "dist*"])
    #expect(RecordCommandTests.trees(dist.stdout).values.first == ["distance2() {", "  square();", "  square();", "}"])
    let square = try run(["replay", "-d", trace.path, "-F", "square"])
    #expect(RecordCommandTests.trees(square.stdout).values.first == ["square();", "square();"])
    let partial = try run(["replay", "-d", trace.path, "-F", "quar"])
    #expect(partial.status != 0 && partial.stderr.contains("no recorded function matches -F 'quar'"))
  }

  @Test func usageErrorsAreNotCorruptTraces() throws {
    let trace = try Self.demo.get().trace
    for arguments in [
      ["replay", "-d", trace.path, "-F", "(unclosed"], ["replay", "-d", trace.path, "--tid", "1"],
      ["report", "-d", trace.path, "-N", "[z"],
    ] {
      let result = try run(arguments)
      #expect(result.status != 0, "\(arguments)")
      #expect(!result.stderr.contains("corrupt"), "\(arguments): \(result.stderr)")
    }
    let tid = try run(["replay", "-d", trace.path, "--tid", "1"])
    #expect(tid.stderr.contains("no thread 1 in the trace (threads: "), "\(tid.stderr)")
  }

  @Test func aRecordTimeFilterThatMatchesNothingFailsAtRecordTime() throws {
    let directory = try Self.demo.get().directory
    let program = directory.appendingPathComponent("patched").path
    for (option, pattern) in [("-F", "no_such_function"), ("-N", "^zz")] {
      let result = try RecordCommandTests.record(
        directory.appendingPathComponent("never"), [program], options: [option, pattern])
      #expect(result.status != 0)
      #expect(result.stderr.contains("\(option): no patchable function matches '\(pattern)'"), "\(result.stderr)")
    }
    #expect(!FileManager.default.fileExists(atPath: directory.appendingPathComponent("never").path))
  }

  @Test func chromeNamesProcessesAndThreadsAndDumpSaysItsUnit() throws {
    let trace = try Self.demo.get().trace
    let chrome = try run(["dump", "--chrome", "-d", trace.path])
    let json = try JSONSerialization.jsonObject(with: Data(chrome.stdout.utf8)) as? [String: Any]
    let events = json?["traceEvents"] as? [[String: Any]] ?? []
    let metadata = events.filter { $0["ph"] as? String == "M" }
    let processes = metadata.filter { $0["name"] as? String == "process_name" }
    let threads = metadata.filter { $0["name"] as? String == "thread_name" }
    #expect(processes.count == 2, "the demo and its fork child")
    #expect(
      processes.allSatisfy { (($0["args"] as? [String: Any])?["name"] as? String)?.hasPrefix("patched (") == true })
    #expect(threads.count == 4)
    #expect(threads.contains { ($0["args"] as? [String: Any])?["name"] as? String == "patched (\($0["tid"]!))" })
    let dump = try run(["dump", "-d", trace.path])
    #expect(dump.stdout.contains("timestamps are time-stamp counter ticks"), "\(dump.stdout.prefix(300))")
  }

  /// Two functions are two rows whatever the names look like: a local class's method and the
  /// function that declares it, a template's two instantiations, an overload pair.
  @Test func reportNeverMergesTwoFunctionsAndEveryNameFormSelects() throws {
    let directory = try TestSupport.temporaryDirectory("reader-cxx")
    let program = directory.appendingPathComponent("cxxnames").path
    try TestSupport.compile(
      compiler: "clang++", sources: [RecordCommandTests.programs.appendingPathComponent("cxxnames.cpp").path],
      flags: ["-O1", "-fpatchable-function-entry=5"], output: program)
    let trace = directory.appendingPathComponent("trace")
    #expect(try RecordCommandTests.record(trace, [program]).stdout == "ok 6\n")
    let report = try run(["report", "-d", trace.path, "-s", "name"])
    let names = report.stdout.split(separator: "\n").dropFirst(2).map { String($0.dropFirst(66)) }
    #expect(
      Set(names) == [
        "main", "plan::Plan::ComputeCriticalPath", "plan::Plan::ComputeCriticalPath::TopoSort::Visit",
        "int twice<int>(int)", "double twice<double>(double)", "scale(int)", "scale(double)",
      ], "\(report.stdout)")
    // --patch, list --match and -F take any form of a name: symbol, full, simple.
    let list = try run(["list", "--match", "plan::*", "--demangle", "simple", program])
    #expect(list.stdout.contains("  plan::Plan::ComputeCriticalPath\n"), "\(list.stdout)")
    #expect(list.stdout.contains("  plan::Plan::ComputeCriticalPath::TopoSort::Visit\n"))
    let patched = directory.appendingPathComponent("patched-trace")
    #expect(try RecordCommandTests.record(patched, [program], options: ["--patch", "scale(double)"]).status == 0)
    let only = try run(["replay", "-d", patched.path])
    #expect(RecordCommandTests.trees(only.stdout).values.first == ["scale();"], "\(only.stdout)")
    let visit = try run(["replay", "-d", trace.path, "-F", "TopoSort::Visit$"])
    #expect(
      RecordCommandTests.trees(visit.stdout).values.first == ["plan::Plan::ComputeCriticalPath::TopoSort::Visit();"])
  }
}
