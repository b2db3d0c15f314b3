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

  /// A thread that switches stacks (coroutines) writes events whose depths jump where the other
  /// stack's suspended calls resume: every call is read, exactly once, and none of it is called
  /// damage (it was: the rest of the file was skipped as "not an event"). Built without patch
  /// sites and recorded with --relocate, the returns that find their frame below a suspended
  /// coroutine's (moved to the top: the rotate path) go through images that keep every register:
  /// the program prints what it prints untraced.
  @Test(arguments: [false, true]) func aThreadThatSwitchesStacksIsReadWhole(relocated: Bool) throws {
    let directory = try TestSupport.temporaryDirectory("coroutines")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "coroutines", flags: relocated ? ["-O2"] : ["-O2", "-fpatchable-function-entry=5"], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(trace, [program, "1000"], options: relocated ? ["--relocate"] : [])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    #expect(recorded.stdout == (try TestSupport.run(program, ["1000"])).stdout && recorded.stdout == "1997001\n")
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["outer"] == 1000 && counts["inner"] == 1000 && counts["leaf"] == 3999, "\(counts)")
    for reader in [["replay"], ["report"], ["dump", "--chrome"]] {
      let read = try run(reader + ["-d", trace.path])
      #expect(read.status == 0 && !read.stderr.contains("damaged"), "\(reader): \(read.stderr)")
    }
  }

  @Test func theReadmeValueExamplesShowWhatTheySay() throws {
    let trace = try Self.demo.get().trace
    let replay = try run(["replay", "-d", trace.path])
    #expect(replay.status == 0 && replay.stderr.isEmpty, "\(replay.stderr)")
    for line in [
      "report(\"fib\", 0x8) {", "printf@plt();", "parse_number() {", "} = 1; /* parse_number */", "average() = 10.25;",
      "fib(6) {", "} = 8; /* fib */",
    ] {
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
    let program = try RecordCommandTests.program(
      "cxxnames", compiler: "clang++", flags: ["-O1", "-fpatchable-function-entry=5"], in: directory)
    let trace = directory.appendingPathComponent("trace")
    #expect(try RecordCommandTests.record(trace, [program], options: ["--no-libcall"]).stdout == "ok 6\n")
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

extension ReaderBehaviourTests {
  /// The demo recorded once more, without values, for the oracles below.
  static let plainDemo: Result<URL, any Error> = Result {
    let directory = try TestSupport.temporaryDirectory("reader-plain")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.examples.appendingPathComponent("demo/demo.c").path], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(trace, [program, "7"])
    guard recorded.status == 0 else { throw TestSupport.CompileError(description: recorded.stderr) }
    return trace
  }

  /// "   1.234 us" → nanoseconds.
  static func nanoseconds(_ text: Substring) -> Double? {
    let parts = text.split(separator: " ")
    guard parts.count == 2, let value = Double(parts[0]) else { return nil }
    switch parts[1] {
    case "us": return value * 1e3
    case "ms": return value * 1e6
    case "s": return value * 1e9
    default: return nil
    }
  }

  /// `report`'s total, self, calls, min and max per function, recomputed from `dump`'s raw events
  /// (counter ticks and depths) with the clock rate the dump states.
  @Test func reportAgreesWithTheRawEvents() throws {
    let trace = try Self.plainDemo.get()
    let dump = try run(["dump", "-d", trace.path])
    let rateLine = try #require(dump.stdout.split(separator: "\n").first { $0.contains("timestamps are") })
    let rate = try #require(Double(rateLine.split(separator: " ").dropLast(2).last ?? ""))
    struct Open {
      let name: String
      let start: UInt64
      var children = 0.0
    }
    struct Row: Equatable {
      var total = 0.0, selfTime = 0.0, calls = 0, minimum = Double.infinity, maximum = 0.0
    }
    var rows: [String: Row] = [:]
    var stacks: [String: [Open]] = [:]
    for line in dump.stdout.split(separator: "\n") where !line.hasPrefix("#") {
      let fields = line.split(separator: " ", maxSplits: 5).map(String.init)
      guard fields.count == 6, let ticks = UInt64(fields[0]) else { continue }
      let (tid, kind, name) = (fields[1], fields[2], fields[5])
      if kind == "[entry]" {
        stacks[tid, default: []].append(Open(name: name, start: ticks))
        continue
      }
      guard let call = stacks[tid]?.popLast() else { continue }
      let duration = Double(ticks - call.start) / rate
      if !(stacks[tid]?.isEmpty ?? true) { stacks[tid]![stacks[tid]!.count - 1].children += duration }
      var row = rows[call.name] ?? Row()
      if !(stacks[tid] ?? []).contains(where: { $0.name == call.name }) { row.total += duration }
      row.selfTime += duration - call.children
      row.calls += 1
      row.minimum = min(row.minimum, duration)
      row.maximum = max(row.maximum, duration)
      rows[call.name] = row
    }
    // The calls the fork child never returned from (it exits inside them) have no exit.
    let report = try run(["report", "-d", trace.path, "-s", "name"])
    var checked = 0
    for line in report.stdout.split(separator: "\n").dropFirst(2) {
      let name = String(line.dropFirst(66))
      let columns = [2, 15, 40, 53].map { line.dropFirst($0).prefix(11) }
      guard let expected = rows[name], name != "main" && name != "run_child" else { continue }
      let values = columns.compactMap(Self.nanoseconds)
      let calls = Int(line.dropFirst(28).prefix(10).trimmingCharacters(in: .whitespaces))
      #expect(calls == expected.calls, "\(name)")
      for (value, wanted) in zip(values, [expected.total, expected.selfTime, expected.minimum, expected.maximum]) {
        // Shown to 3 decimals of us, ms or s: half the last digit, and a nanosecond of rounding.
        let shownTo = value < 1e6 ? 1.0 : value < 1e9 ? 1e3 : 1e6
        #expect(abs(value - wanted) <= shownTo / 2 + 1.5, "\(name): \(value) against \(wanted)")
      }
      checked += 1
    }
    #expect(checked >= 8, "\(report.stdout)")
  }

  @Test func thresholdsThreadsAndLive() throws {
    let trace = try Self.plainDemo.get()
    let slow = try run(["replay", "-d", trace.path, "-t", "100us"])
    let shown = slow.stdout.split(separator: "\n").filter { !$0.hasPrefix("#") }
    #expect(!shown.isEmpty)
    for line in shown {
      guard let duration = Self.nanoseconds(line.prefix(11).drop { $0 == " " }) else { continue }
      #expect(duration >= 100_000, "\(line)")
    }
    #expect(!slow.stdout.contains("square"))
    let perThread = try run(["report", "-d", trace.path, "--threads"])
    #expect(perThread.stdout.components(separatedBy: "# thread ").count - 1 == 4, "\(perThread.stdout)")

    let directory = try TestSupport.temporaryDirectory("reader-live")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.programs.appendingPathComponent("killed.c").path], in: directory)
    let live = try run(["live", "--", program, "exit"])
    #expect(live.status == 7, "the program's status passes through")
    #expect(RecordCommandTests.trees(live.stdout).values.first?.filter { $0 == "  step();" }.count == 100)
  }

  /// -F/-N/-D given to `record` are stored and applied by every reader; -D also limits what the
  /// agent records.
  @Test func recordTimeFiltersAreStoredAndApplied() throws {
    let directory = try TestSupport.temporaryDirectory("reader-record-filters")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.examples.appendingPathComponent("demo/demo.c").path], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(
      trace, [program, "5"], options: ["-F", "^main$", "-N", "^report$", "-D", "2"])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    let replay = try run(["replay", "-d", trace.path])
    let main = RecordCommandTests.trees(replay.stdout).values.first { $0.first == "main() {" } ?? []
    #expect(!main.isEmpty && !main.contains { $0.contains("report") }, "\(replay.stdout)")
    #expect(main.allSatisfy { !$0.hasPrefix("    ") }, "two levels: \(main)")
    let dump = try run(["dump", "-d", trace.path])
    let depths = dump.stdout.split(separator: "\n").compactMap { line -> Int? in
      guard let range = line.range(of: " depth ") else { return nil }
      return Int(line[range.upperBound...].prefix { $0 != " " })
    }
    #expect(!depths.isEmpty && depths.allSatisfy { $0 < 2 }, "the agent recorded nothing deeper")
  }
}

extension ReaderBehaviourTests {
  /// 64 scribbled bytes in the middle of a thread's events: each reader keeps the rest of that
  /// thread and says once, on stderr, which file, where, and about how much was lost.
  @Test func aScribbledTraceLosesOnlyTheScribbledPart() throws {
    let source = try Self.plainDemo.get()
    let trace = try TestSupport.temporaryDirectory("reader-scribbled").appendingPathComponent("trace")
    try FileManager.default.copyItem(at: source, to: trace)
    // The main thread's file: the one with the most events.
    let files = try FileManager.default.contentsOfDirectory(atPath: trace.path).filter { $0.hasSuffix(".events") }
    let before = try run(["dump", "-d", trace.path]).stdout
    let main = try #require(
      files.max { a, b in
        let sizeA = before.components(separatedBy: " \(a.split(separator: "-").last!.dropLast(7)) [").count
        let sizeB = before.components(separatedBy: " \(b.split(separator: "-").last!.dropLast(7)) [").count
        return sizeA < sizeB
      })
    let path = trace.appendingPathComponent(main).path
    var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
    // Half way through the events the thread wrote.
    let end = bytes.lastIndex { $0 != 0 } ?? 4096
    let at = 4096 + (end - 4096) / 2 / 8 * 8
    for index in at..<(at + 64) { bytes[index] = UInt8(truncatingIfNeeded: index &* 37 &+ 11) }
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    let entries = { (text: String) in text.split(separator: "\n").filter { $0.contains("[entry]") }.count }
    for command in [["replay"], ["report"], ["dump", "--chrome"], ["dump"]] {
      let result = try run(command + ["-d", trace.path])
      #expect(result.status == 0, "\(command)")
      let warnings = result.stderr.split(separator: "\n")
      #expect(warnings.count == 1, "\(command): \(result.stderr)")
      #expect(warnings.first?.contains("\(main): damaged at offset ") == true, "\(result.stderr)")
      #expect(warnings.first?.contains("events lost") == true)
      if command == ["dump"] {
        let lost = entries(before) - entries(result.stdout)
        #expect(lost >= 1 && lost <= 8, "\(lost) entries lost to 64 bytes: \(result.stderr)")
      }
    }
    let info = try run(["info", "-d", trace.path])
    #expect(info.stdout.contains("# damaged         : "), "\(info.stdout)")
  }
}
