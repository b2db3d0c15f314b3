import Foundation
import Testing
import TraceryTestSupport

/// `tracery record` / `replay` / `report` / `dump` / `info` end to end, on programs this test
/// builds, compared with what the programs must have done.
@Suite struct RecordCommandTests {
  static let tracery = ListCommandTests.tracery
  static let examples = TestSupport.packageRoot.appendingPathComponent("Examples")
  static let programs = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Programs")

  /// Builds `sources` with patch sites (and the same program with -finstrument-functions when
  /// `instrumented`), at -O0 so both builds make the same calls.
  static func build(
    _ sources: [String], compiler: String = "clang", flags: [String] = [], instrumented: Bool = false,
    in directory: URL
  ) throws -> String {
    let output = directory.appendingPathComponent(instrumented ? "instrumented" : "patched").path
    let common = ["-O0", "-pthread", "-fno-omit-frame-pointer"] + flags
    if instrumented {
      try TestSupport.compile(
        compiler: compiler, sources: sources + [programs.appendingPathComponent("instrument.c").path],
        flags: common + ["-finstrument-functions", "-ldl"], output: output)
    } else {
      try TestSupport.compile(
        compiler: compiler, sources: sources, flags: common + ["-fpatchable-function-entry=5"], output: output)
    }
    return output
  }

  /// `Programs/NAME.c` (`.cpp` for a C++ compiler, `.swift` for swiftc) built with `compiler` and
  /// exactly `flags` into `directory/NAME`.
  static func program(_ name: String, compiler: String = "gcc", flags: [String], in directory: URL) throws -> String {
    let output = directory.appendingPathComponent(name).path
    let suffix = compiler == "swiftc" ? "swift" : compiler.hasSuffix("++") ? "cpp" : "c"
    try TestSupport.compile(
      compiler: compiler, sources: [programs.appendingPathComponent("\(name).\(suffix)").path], flags: flags,
      output: output)
    return output
  }

  /// `Examples/swiftdemo` built as it ships (`swiftc -O`) into `directory/swiftdemo`.
  static func swiftDemo(in directory: URL) throws -> String {
    let output = directory.appendingPathComponent("swiftdemo").path
    try TestSupport.compile(
      compiler: "swiftc", sources: [examples.appendingPathComponent("swiftdemo/swiftdemo.swift").path],
      flags: ["-O", "-parse-as-library"], output: output)
    return output
  }

  static func record(_ directory: URL, _ command: [String], options: [String] = []) throws -> TestSupport.ProcessResult
  {
    try TestSupport.run(tracery, ["record", "-d", directory.path] + options + ["--"] + command)
  }

  /// Replay lines without the duration column, grouped by thread id: "name() {", "name();", "}".
  static func trees(_ replay: String) -> [Int32: [String]] {
    var result: [Int32: [String]] = [:]
    for line in replay.split(separator: "\n") where !line.hasPrefix("#") {
      guard let open = line.firstIndex(of: "["), let close = line.firstIndex(of: "]"),
        let tid = Int32(line[line.index(after: open)..<close].trimmingCharacters(in: .whitespaces)),
        let bar = line.firstIndex(of: "|")
      else { continue }
      var text = String(line[line.index(bar, offsetBy: 2)...])
      if let comment = text.range(of: " /* ") { text = String(text[..<comment.lowerBound]) }
      result[tid, default: []].append(text)
    }
    return result
  }

  /// The replay lines of fib(n) at `indent` levels, as -O0 code calls it.
  static func fibTree(_ n: Int, indent: Int) -> [String] {
    let pad = String(repeating: "  ", count: indent)
    if n < 2 { return ["\(pad)fib();"] }
    return ["\(pad)fib() {"] + fibTree(n - 1, indent: indent + 1) + fibTree(n - 2, indent: indent + 1) + ["\(pad)}"]
  }

  /// Entry counts per function name from `tracery dump` (every process and thread).
  static func recordedCounts(_ directory: URL) throws -> [String: Int] {
    // Full names: overloads stay apart, as nm and c++filt name them.
    let dump = try TestSupport.run(tracery, ["dump", "-d", directory.path, "--demangle", "full"])
    #expect(dump.status == 0, "\(dump.stderr)")
    var counts: [String: Int] = [:]
    for line in dump.stdout.split(separator: "\n") where line.contains("[entry]") {
      // "TIMESTAMP TID [entry] depth D NAME", where NAME may hold spaces.
      let name = line.split(separator: " ", maxSplits: 5)[5]
      counts[String(name), default: 0] += 1
    }
    return counts
  }

  /// Entry counts per function of the -finstrument-functions build, named with nm.
  static func instrumentedCounts(_ binary: String, arguments: [String], in directory: URL) throws -> [String: Int] {
    let counts = directory.appendingPathComponent("counts")
    try FileManager.default.createDirectory(at: counts, withIntermediateDirectories: true)
    let run = try TestSupport.run(binary, arguments, environment: ["TRACERY_COUNTS": counts.path])
    #expect(run.status == 0, "\(run.stderr)")
    let names = Dictionary(try Binutils.functions(binary).map { ($0.address, $0.name) }) { a, _ in a }
    var result: [String: Int] = [:]
    for file in try FileManager.default.contentsOfDirectory(atPath: counts.path) {
      let text = try String(contentsOfFile: counts.appendingPathComponent(file).path, encoding: .utf8)
      for line in text.split(separator: "\n") {
        let fields = line.split(separator: " ")
        guard fields.count == 2, let offset = UInt64(fields[0], radix: 16), let count = Int(fields[1]) else { continue }
        result[names[offset] ?? "0x\(fields[0])", default: 0] += count
      }
    }
    return result
  }

  @Test func theDemoReplaysAsItRan() throws {
    let directory = try TestSupport.temporaryDirectory("record-demo")
    let demo = try Self.build([Self.examples.appendingPathComponent("demo/demo.c").path], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try Self.record(trace, [demo, "6"])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    #expect(recorded.stdout.contains("threads    8"))
    // The program's own functions (library calls, recorded by default, hidden here; below).
    let replay = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-N", "@plt$"])
    #expect(replay.status == 0, "\(replay.stderr)")
    let trees = Self.trees(replay.stdout)
    #expect(trees.count == 4, "main, two workers and the fork child: \(trees.keys.sorted())")
    let main = trees.values.first { $0.first == "main() {" }
    let expectedMain =
      ["main() {", "  parse_number();"] + Self.fibTree(6, indent: 1) + Self.fibTree(3, indent: 1)
      + ["  distance2() {", "    square();", "    square();", "  }", "  report();", "  report();", "  report();"]
      + ["  average();", "  run_threads();", "  report();", "  run_child();", "  report();", "}"]
    #expect(main == expectedMain)
    let workers = trees.values.filter { $0.first == "worker() {" }.map { Array($0.dropFirst().dropLast()) }
    #expect(Set(workers) == [Self.fibTree(5, indent: 1), Self.fibTree(4, indent: 1)])
    // The fork child's calls nest in the frames it inherited (main, run_child), as uftrace shows them.
    let child = trees.values.first { $0.first == "    child_work() {" }
    #expect(child == ["    child_work() {"] + Self.fibTree(3, indent: 3) + ["    }"], "\(replay.stdout)")

    // Library calls are recorded by default, as uftrace records them: where the program made them.
    let reports = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-F", "^(report|run_threads)$"])
    let reportTrees = Self.trees(reports.stdout).values.first ?? []
    #expect(Array(reportTrees.prefix(3)) == ["report() {", "  printf@plt();", "}"], "\(reports.stdout)")
    #expect(
      reportTrees.contains("run_threads() {") && reportTrees.filter { $0 == "  pthread_create@plt();" }.count == 2,
      "\(reports.stdout)")

    // The fork child is its own process in the trace.
    let info = try TestSupport.run(Self.tracery, ["info", "-d", trace.path])
    #expect(info.stdout.components(separatedBy: "# process ").count - 1 == 2, "\(info.stdout)")
  }

  @Test(arguments: ["c", "c++"])
  func callCountsEqualAnInstrumentedBuild(language: String) throws {
    let directory = try TestSupport.temporaryDirectory("record-counts")
    let (sources, compiler, arguments) =
      language == "c"
      ? ([Self.examples.appendingPathComponent("demo/demo.c").path], "clang", ["7"])
      : ([Self.examples.appendingPathComponent("cxxdemo/cxxdemo.cpp").path], "clang++", [String]())
    let patched = try Self.build(sources, compiler: compiler, in: directory)
    let instrumented = try Self.build(sources, compiler: compiler, instrumented: true, in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try Self.record(trace, [patched] + arguments)
    #expect(recorded.status == 0, "\(recorded.stderr)")
    var expected = try Self.instrumentedCounts(instrumented, arguments: arguments, in: directory)
    var actual = try Self.recordedCounts(trace)
    if language == "c++" {
      // Compare by demangled name: dump demangles, nm does not.
      let demangled = try TestSupport.run(TestSupport.which("c++filt")!, Array(expected.keys)).stdout.split(
        separator: "\n")
      expected = Dictionary(zip(demangled.map(String.init), expected.values)) { $0 + $1 }
      actual = actual.filter { !$0.key.hasPrefix("0x") }
    }
    #expect(!expected.isEmpty)
    // Library calls (recorded by default) are not functions of the program: the instrumented build
    // does not count them.
    #expect(actual.keys.contains { $0.hasSuffix("@plt") })
    #expect(actual.filter { !$0.key.hasSuffix("@plt") } == expected)
  }

  /// A script (`#!/bin/sh`, and `#!/usr/bin/env sh` as pyenv's and npm's shims are) records as
  /// its interpreter runs it, and the programs it starts: before, `record` refused it as "not an
  /// ELF file".
  @Test(arguments: ["/bin/sh", "/usr/bin/env sh"])
  func aScriptRecordsAsItsInterpreterRunsIt(interpreter: String) throws {
    let directory = try TestSupport.temporaryDirectory("record-script")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try Self.program("deep", flags: ["-O2", "-fpatchable-function-entry=5"], in: directory)
    let script = directory.appendingPathComponent("run.sh")
    try "#!\(interpreter)\nexec \"\(program)\" 10\n".write(to: script, atomically: true, encoding: .utf8)
    chmod(script.path, 0o755)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try Self.record(trace, [script.path], options: ["--no-libcall"])
    #expect(recorded.status == 0 && recorded.stdout == "10 10\n", "\(recorded.stderr)")
    #expect(try Self.recordedCounts(trace)["down"] == 22)
  }

  @Test func exitStatusAndSignalsPassThroughAndAKilledProgramReplaysUpToTheKill() throws {
    let directory = try TestSupport.temporaryDirectory("record-kill")
    let program = try Self.build([Self.programs.appendingPathComponent("killed.c").path], in: directory)
    let exited = try Self.record(
      directory.appendingPathComponent("exit"), [program, "exit"], options: ["--no-libcall"])
    #expect(exited.status == 7)

    let trace = directory.appendingPathComponent("kill")
    let process = Process()
    process.executableURL = URL(fileURLWithPath: Self.tracery)
    process.arguments = ["record", "-d", trace.path, "--no-libcall", "--", program, "kill"]
    process.standardOutput = FileHandle.nullDevice
    try process.run()
    process.waitUntilExit()
    #expect(process.terminationReason == .uncaughtSignal)
    #expect(process.terminationStatus == SIGKILL)

    let replay = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path])
    #expect(replay.status == 0, "\(replay.stderr)")
    // Its last chunk unsealed, and no exit in its process file: not damage, and said so by info.
    #expect(replay.stderr.isEmpty, "\(replay.stderr)")
    let info = try TestSupport.run(Self.tracery, ["info", "-d", trace.path]).stdout
    #expect(info.contains("#   ended     : without its exit (killed"), "\(info)")
    #expect(
      try TestSupport.run(Self.tracery, ["info", "-d", directory.appendingPathComponent("exit").path]).stdout
        .contains("#   ended     : exit ran"))
    let lines = Self.trees(replay.stdout).values.first ?? []
    #expect(lines.filter { $0 == "  step();" }.count == 100)
    // The calls the kill left open close innermost first.
    #expect(Array(lines.suffix(4)) == ["  fatal() {", "    die();", "  }", "}"], "\(replay.stdout)")
    #expect(replay.stdout.contains("die(); /* no exit recorded */"))
    let closing = replay.stdout.split(separator: "\n").suffix(2).map { $0.split(separator: "|").last ?? "" }
    #expect(closing == ["   } /* fatal: no exit recorded */", " } /* main: no exit recorded */"], "\(replay.stdout)")
  }

  @Test func aCxxExceptionThroughTracedFramesIsCaughtAsUntraced() throws {
    let directory = try TestSupport.temporaryDirectory("record-throw")
    let program = try Self.build(
      [Self.programs.appendingPathComponent("throws.cpp").path], compiler: "clang++", in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try Self.record(trace, [program])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    #expect(recorded.stdout == "caught 42 then 7\n")
    // Library calls are recorded by default, but not `__cxa_begin_catch`: its interposer closes the
    // unwound calls, and a traced call of it entered first (the program stopped at its return).
    let all = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path])
    #expect(
      !all.stdout.contains("__cxa_begin_catch") && all.stdout.contains("|   __cxa_end_catch@plt();"), "\(all.stdout)")
    #expect(all.stdout.contains("|         std::runtime_error::runtime_error@plt();"), "\(all.stdout)")
    let replay = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-N", "@plt$"])
    #expect(replay.status == 0, "\(replay.stderr)")
    let lines = Self.trees(replay.stdout).values.first ?? []
    // The calls the exception left have no exit; the ones after it are traced again (names are
    // demangled, without parameters, as uftrace shows them).
    #expect(lines.contains { $0.hasSuffix("after();") }, "\(replay.stdout)")
    #expect(lines.filter { $0.hasSuffix("deepest();") }.count == 2, "\(replay.stdout)")
    #expect(replay.stdout.contains("outer() {"))
    // The frames the exception did not unwind keep their exits: main closes normally, and the
    // calls after the catch stay nested in it; the unwound ones close before the next call.
    #expect(replay.stdout.contains("} /* main */"), "\(replay.stdout)")
    #expect(lines.contains("  after();"), "\(replay.stdout)")
    let unwound = ["      deepest();", "    }", "  }", "  outer() {"]
    #expect(lines.indices.contains { Array(lines[$0...].prefix(4)) == unwound }, "\(replay.stdout)")

    // --demangle full keeps the parameter types, --demangle no the symbols.
    let full = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "--demangle", "full"])
    #expect(full.stdout.contains("outer(int)() {") && full.stdout.contains("after(int)();"), "\(full.stdout)")
    let raw = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "--demangle", "no"])
    #expect(raw.stdout.contains("_Z5outeri() {") && raw.stdout.contains("_Z5afteri();"), "\(raw.stdout)")
    let wrong = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "--demangle", "fancy"])
    #expect(wrong.status != 0 && wrong.stderr.contains("demangle"), "\(wrong.stderr)")

    // Patterns name C++ functions as uftrace users write them: without parameter types.
    let valued = directory.appendingPathComponent("valued")
    let again = try Self.record(
      valued, [program], options: ["-A", "^middle$@arg1/d32", "-R", "after@retval/d32"])
    #expect(again.status == 0, "\(again.stderr)")
    let shown = try TestSupport.run(Self.tracery, ["replay", "-d", valued.path, "-F", "outer"])
    #expect(shown.status == 0, "\(shown.stderr)")
    #expect(shown.stdout.contains("middle(1) {") && shown.stdout.contains("middle(0) {"), "\(shown.stdout)")
    let valuedReplay = try TestSupport.run(Self.tracery, ["replay", "-d", valued.path])
    #expect(valuedReplay.stdout.contains("after() = 7;"), "\(valuedReplay.stdout)")
  }

  /// The agent carries its own Swift runtime and starts after that runtime's initializers: a
  /// start before them (from a constructor) built its dictionaries with one hashing seed and
  /// searched them with another, and about half the runs lost their values. Six runs in a row
  /// keep them.
  @Test func valuesAreKeptInEveryRun() throws {
    let directory = try TestSupport.temporaryDirectory("record-values-runs")
    let program = try Self.build([Self.programs.appendingPathComponent("values.c").path], in: directory)
    for run in 0..<6 {
      let trace = directory.appendingPathComponent("trace-\(run)")
      let recorded = try Self.record(trace, [program], options: ["-A", "add@arg1,arg2/x", "-R", "add@retval"])
      #expect(recorded.status == 0, "\(recorded.stderr)")
      let replay = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path])
      #expect(replay.stdout.contains("add(40, 0xfffffffffffffffe) = 38;"), "run \(run): \(replay.stdout)")
    }
  }

  @Test func argumentsAndReturnValuesAsUftraceShowsThem() throws {
    let directory = try TestSupport.temporaryDirectory("record-values")
    let program = try Self.build([Self.programs.appendingPathComponent("values.c").path], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let options = [
      "-A", "add@arg1,arg2/x", "-R", "add@retval", "-A", "^greet$@arg1/s,arg2/u", "-R", "greet@retval/d32",
      "-A", "fib@arg1", "-R", "fib@retval", "-R", "initial@retval/c", "-A", "initial@arg1/x8",
      "-A", "scale@fparg1,arg1,fparg2/f32", "-R", "scale@retval/f",
    ]
    let recorded = try Self.record(trace, [program], options: options + ["--no-libcall"])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    #expect(recorded.stdout == "38 42 -1 99 w 2 4.75\n")
    let replay = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path])
    #expect(replay.status == 0, "\(replay.stderr)")
    let long = "\"" + String(repeating: "a", count: 64) + "\"..."
    // The pointer's low byte, whatever it is.
    let initialArgument = try #require(
      replay.stdout.split(separator: "\n").first { $0.contains("initial(0x") }.flatMap { line in
        line.firstRange(of: "initial(").map { line[$0.upperBound...].prefix { $0 != ")" } }
      })
    let expected = [
      "main() {",
      "  add(40, 0xfffffffffffffffe) = 38;",
      "  greet(\"world \\\"quoted\\\"\", 3) = 42;",
      "  greet(<bad address 0x10>, 1) = -1;",
      "  greet(\(long), 1) = 99;",
      "  initial(\(initialArgument)) = 'w';",
      "  fib(3) {",
      "    fib(2) {",
      "      fib(1) = 1;",
      "      fib(0) = 0;",
      "    } = 1;",
      "    fib(1) = 1;",
      "  } = 2;",
      "  scale(1.5, 3, 0.25) = 4.75;",
      "}",
    ]
    #expect(Self.trees(replay.stdout).values.first == expected, "\(replay.stdout)")
    // Functions without a spec keep their plain lines; `dump` shows the values too.
    let dump = try TestSupport.run(Self.tracery, ["dump", "-d", trace.path])
    #expect(dump.stdout.contains("[entry] depth 1 add 40, 0xfffffffffffffffe"), "\(dump.stdout)")
    #expect(dump.stdout.contains("[exit ] depth 1 add 38"), "\(dump.stdout)")
    let chrome = try TestSupport.run(Self.tracery, ["dump", "--chrome", "-d", trace.path])
    #expect(chrome.stdout.contains("\"args\":{\"arg1\":\"40\",\"arg2\":\"0xfffffffffffffffe\",\"retval\":\"38\"}"))
    #expect(chrome.stdout.contains("\"arg1\":\"\\\"world \\\\\\\"quoted\\\\\\\"\\\"\""), "\(chrome.stdout)")
  }

  @Test func anExecdImageIsRecordedAsANewSession() throws {
    let directory = try TestSupport.temporaryDirectory("record-exec")
    let program = try Self.build([Self.programs.appendingPathComponent("execs.c").path], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try Self.record(trace, [program], options: ["--no-libcall"])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    #expect(recorded.stdout == "before 2\nafter 42\n")
    let files = try FileManager.default.contentsOfDirectory(atPath: trace.path)
    #expect(files.filter { $0.hasPrefix("process-") }.count == 2, "\(files)")
    let replay = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path])
    // One pid, two images: the first main never returns (exec replaced it).
    #expect(
      Self.trees(replay.stdout).values.first == [
        "main() {", "  before_exec();", "}", "main() {", "  after_exec();", "}",
      ],
      "\(replay.stdout)")
    #expect(replay.stdout.contains("} /* main: no exit recorded */"))
  }

  @Test func reportAndDumpsAgreeWithTheCalls() throws {
    let directory = try TestSupport.temporaryDirectory("record-report")
    let program = try Self.build([Self.programs.appendingPathComponent("killed.c").path], in: directory)
    let trace = directory.appendingPathComponent("trace")
    #expect(try Self.record(trace, [program, "exit"], options: ["--no-libcall"]).status == 7)

    let report = try TestSupport.run(Self.tracery, ["report", "-d", trace.path, "-s", "calls"])
    #expect(report.status == 0, "\(report.stderr)")
    let rows = report.stdout.split(separator: "\n").filter { $0.hasSuffix(" step") || $0.hasSuffix(" main") }
    #expect(rows.first?.hasSuffix(" step") == true, "sorted by calls: \(report.stdout)")
    #expect(rows.first?.contains("        100  ") == true)

    let chrome = try TestSupport.run(Self.tracery, ["dump", "--chrome", "-d", trace.path])
    let json = try JSONSerialization.jsonObject(with: Data(chrome.stdout.utf8)) as? [String: Any]
    let events = json?["traceEvents"] as? [[String: Any]] ?? []
    #expect(events.filter { $0["name"] as? String == "step" }.count == 100)

    let folded = try TestSupport.run(Self.tracery, ["dump", "--folded", "-d", trace.path])
    #expect(
      folded.stdout.split(separator: "\n").map { $0.split(separator: " ").first! }.sorted() == ["main", "main;step"])

    // Read-time filters: -N hides step, -F shows only it, -D 1 the roots only.
    let hidden = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-N", "step"])
    #expect(Self.trees(hidden.stdout).values.first == ["main();"])
    let only = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-F", "st.p"])
    #expect(Self.trees(only.stdout).values.first.map { Set($0) } == ["step();"])
    let glob = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-F", "st*", "--match", "glob"])
    #expect(Self.trees(glob.stdout).values.first?.allSatisfy { $0 == "step();" } == true)
    let shallow = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-D", "1"])
    #expect(Self.trees(shallow.stdout).values.first == ["main();"])
  }

  @Test(arguments: ["record", "live"])
  func helpIsShownNotTakenForTheProgram(command: String) throws {
    let result = try TestSupport.run(Self.tracery, [command, "--help"])
    #expect(result.status == 0, "\(result.stderr)")
    #expect(result.stdout.contains("USAGE: tracery \(command)"))
  }

  /// Every bad input: one line on stderr, "tracery: ...", and a non-zero status.
  @Test func badInputsSayWhatIsWrong() throws {
    let directory = try TestSupport.temporaryDirectory("record-bad")
    // Not a program (a script): said, not run. (A program without patch sites is recorded:
    // `RelocatedRecordTests`.)
    // (A script records as its interpreter: this file is neither.)
    let script = directory.appendingPathComponent("notes.txt").path
    try "hi\n".write(toFile: script, atomically: true, encoding: .utf8)
    chmod(script, 0o755)
    let program = try Self.build([Self.programs.appendingPathComponent("killed.c").path], in: directory)
    let trace = directory.appendingPathComponent("trace")
    #expect(try Self.record(trace, [program, "exit"]).status == 7)
    let corrupt = directory.appendingPathComponent("corrupt")
    try FileManager.default.copyItem(at: trace, to: corrupt)
    let events = try FileManager.default.contentsOfDirectory(atPath: corrupt.path).first { $0.hasSuffix(".events") }!
    try Data("TRACERY".utf8).write(to: corrupt.appendingPathComponent(events))
    let badProcess = directory.appendingPathComponent("bad-process")
    try FileManager.default.copyItem(at: trace, to: badProcess)
    let process = try FileManager.default.contentsOfDirectory(atPath: badProcess.path).first {
      $0.hasPrefix("process-")
    }!
    try Data("tracery-process 1\npid x\n".utf8).write(to: badProcess.appendingPathComponent(process))

    let cases: [(arguments: [String], message: String)] = [
      (["record", "--bogus", "--", program], "Unknown option '--bogus'"),
      (["record", "-d", directory.appendingPathComponent("t1").path, "--", "/no/such/program"], "program not found"),
      (
        ["record", "-d", directory.appendingPathComponent("t2").path, "--", "no-such-program-anywhere"],
        "program not found"
      ),
      (["record", "-d", directory.appendingPathComponent("t3").path, "--", script], "not an ELF file"),
      (
        ["record", "-d", directory.appendingPathComponent("t4").path, "--patch", "nothing_*", "--", program],
        "no patchable function matches 'nothing_*'"
      ),
      (["record", "-A", "fib", "--", program], "-A 'fib': expected PATTERN@arg1,arg2,..."),
      (["record", "-A", "fib@arg7", "--", program], "'arg7' is not arg1 ... arg6"),
      (["record", "-R", "fib@arg1", "--", program], "'arg1' is not retval"),
      (["record", "-A", "fib@arg1/q", "--", program], "format 'q' is not d, i, u, x"),
      (["record", "-A", "fib@arg1/s32", "--", program], "format 's32' is not d, i, u, x"),
      (
        ["record", "-d", directory.appendingPathComponent("t5").path, "-R", "nothing_here@retval", "--", program],
        "-R: no patchable function matches 'nothing_here'"
      ),
      (["replay", "-d", trace.path, "-F", "nothing_here"], "no recorded function matches -F 'nothing_here'"),
      (["replay", "-d", trace.path, "-F", "(unclosed"], "invalid regular expression"),
      (["replay", "-d", directory.appendingPathComponent("missing").path], "no trace at"),
      (["replay", "-d", directory.path], "not a trace directory"),
      (["report", "-d", trace.path, "-s", "weight"], "--sort must be one of"),
    ]
    for (arguments, message) in cases {
      let result = try TestSupport.run(Self.tracery, arguments)
      #expect(result.status != 0, "\(arguments)")
      let lines = result.stderr.split(separator: "\n")
      #expect(lines.count == 1, "\(arguments): \(result.stderr)")
      #expect(result.stderr.hasPrefix("tracery: ") && result.stderr.contains(message), "\(arguments): \(result.stderr)")
    }
    // A damaged part is skipped with one warning, and the rest is read.
    let damaged: [(arguments: [String], message: String)] = [
      (["replay", "-d", corrupt.path], "truncated"),
      (["report", "-d", badProcess.path], "'pid' is not a number"),
    ]
    for (arguments, message) in damaged {
      let result = try TestSupport.run(Self.tracery, arguments)
      #expect(result.status == 0, "\(arguments): \(result.stderr)")
      #expect(
        result.stderr.hasPrefix("tracery: warning: ") && result.stderr.contains(message),
        "\(arguments): \(result.stderr)")
    }
  }
}
