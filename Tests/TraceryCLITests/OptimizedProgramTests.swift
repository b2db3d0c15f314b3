import Foundation
import Testing
import TraceryTestSupport

/// `tracery record` end to end on programs built as they ship: -O2 without frame pointers, where
/// compilers turn `return f(x);` into a tail call, by every compiler and patch-site flavour the
/// README lists.
@Suite struct OptimizedProgramTests {
  static let tracery = ListCommandTests.tracery
  static let programs = RecordCommandTests.programs

  struct Build: Sendable, CustomStringConvertible {
    let name: String
    let compiler: String
    let flags: [String]
    var description: String { name }
  }

  static let builds = [
    Build(name: "clang -O2", compiler: "clang", flags: ["-fomit-frame-pointer", "-fpatchable-function-entry=5"]),
    Build(
      name: "gcc -O2 (NOP sleds)", compiler: "gcc", flags: ["-fomit-frame-pointer", "-fpatchable-function-entry=5"]),
    // gcc refuses -pg without frame pointers.
    Build(
      name: "gcc -O2 -pg -mfentry", compiler: "gcc",
      flags: ["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-no-pie"]),
    Build(
      name: "clang -O2 -fcf-protection", compiler: "clang",
      flags: ["-fomit-frame-pointer", "-fpatchable-function-entry=5", "-fcf-protection=full"]),
  ]

  static func build(_ source: String, _ build: Build, in directory: URL, extra: [String] = []) throws -> String {
    let output = directory.appendingPathComponent("program").path
    try TestSupport.compile(
      compiler: build.compiler, sources: [programs.appendingPathComponent(source).path],
      flags: ["-O2", "-pthread"] + build.flags + extra, output: output)
    return output
  }

  /// Runs `program` untraced and under `record`: same output, same status. Returns the trace.
  static func recordAsUntraced(_ program: String, _ arguments: [String] = [], in directory: URL) throws -> URL {
    let untraced = try TestSupport.run(program, arguments)
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program] + arguments)
    #expect(traced.status == untraced.status, "\(traced.stderr)")
    #expect(traced.stdout == untraced.stdout)
    return trace
  }

  @Test(arguments: builds)
  func tailCallsLongjmpAndThreads(build: Build) throws {
    let directory = try TestSupport.temporaryDirectory("optimized-tails")
    let program = try Self.build("tails.c", build, in: directory)
    // The compiler made the tail calls this test is about.
    let code = try TestSupport.run(TestSupport.which("objdump")!, ["-d", "--no-show-raw-insn", program]).stdout
    for (caller, callee) in [("mid", "leaf"), ("top", "mid"), ("even", "odd"), ("jump_mid", "jumper")] {
      let body = code.components(separatedBy: "<\(caller)>:\n").dropFirst().first?.components(separatedBy: "\n\n")
        .first
      #expect(body?.contains("jmp") == true && body?.contains("<\(callee)>") == true, "\(caller) → \(callee)")
    }
    let trace = try Self.recordAsUntraced(program, in: directory)
    // The program's own functions (its library calls, recorded by default, hidden).
    let replay = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-N", "@plt$"])
    #expect(replay.status == 0 && replay.stderr.isEmpty, "\(replay.stderr)")
    let trees = RecordCommandTests.trees(replay.stdout)
    let main = [
      "main() {",
      "  top() {", "    mid() {", "      leaf();", "    }", "  }",
      "  even() {", "    odd() {", "      even() {", "        odd() {", "          even();", "        }", "      }",
      "    }", "  }",
      "  jump_mid() {", "    jumper();", "  }",
      "  leaf();",
      "}",
    ]
    #expect(trees.values.filter { $0.first == "main() {" } == [main], "\(replay.stdout)")
    #expect(trees.values.filter { $0.first == "worker() {" }.count == 3, "\(replay.stdout)")
    #expect(trees.values.filter { $0.first == "worker() {" }.allSatisfy { $0 == ["worker() {", "  leaf();", "}"] })
    // Every exit returned where it should: the program's own result says so (120).
    #expect(try TestSupport.run(program, []).stdout == "120\n")
  }

  /// A thread's first recorded call does not pay for the thread's set-up (its event file and
  /// first chunk, its shadow stack: ~0.3 ms here). Each worker runs two tiny calls.
  @Test func threadSetUpIsNotInAnyInterval() throws {
    let directory = try TestSupport.temporaryDirectory("optimized-setup")
    let program = try Self.build("tails.c", Self.builds[0], in: directory)
    let trace = try Self.recordAsUntraced(program, in: directory)
    let dump = try TestSupport.run(Self.tracery, ["dump", "-d", trace.path])
    // Per thread: "TIMESTAMP TID [entry] depth 0 worker" ... the same thread's last event.
    var spans: [String: (first: UInt64, last: UInt64, worker: Bool)] = [:]
    for line in dump.stdout.split(separator: "\n") where !line.hasPrefix("#") {
      let fields = line.split(separator: " ")
      guard fields.count >= 6, let time = UInt64(fields[0]) else { continue }
      let tid = String(fields[1])
      let span = spans[tid] ?? (time, time, fields.last == "worker")
      spans[tid] = (span.first, time, span.worker)
    }
    let info = try TestSupport.run(Self.tracery, ["info", "-d", trace.path]).stdout
    let file = try processFile(trace)
    let process = try String(contentsOf: try #require(file), encoding: .utf8)
    let rateLine = process.split(separator: "\n").first { $0.hasPrefix("ticks-per-ns ") }
    let rate = try #require(rateLine.flatMap { Double($0.dropFirst("ticks-per-ns ".count)) })
    let workers = spans.values.filter(\.worker)
    #expect(workers.count == 3, "\(info)")
    for worker in workers {
      let nanoseconds = Double(worker.last - worker.first) / rate
      #expect(nanoseconds < 100_000, "a worker of two tiny calls took \(nanoseconds) ns")
    }
  }

  func processFile(_ trace: URL) throws -> URL? {
    try FileManager.default.contentsOfDirectory(atPath: trace.path).first { $0.hasPrefix("process-") }.map {
      trace.appendingPathComponent($0)
    }
  }

  @Test func cxxExceptionsThroughTailCalledFramesBalanceTheTrace() throws {
    let directory = try TestSupport.temporaryDirectory("optimized-throw")
    let program = try Self.build(
      "tailthrow.cpp",
      Build(name: "clang++ -O2", compiler: "clang++", flags: ["-fomit-frame-pointer", "-fpatchable-function-entry=5"]),
      in: directory)
    let trace = try Self.recordAsUntraced(program, in: directory)
    let replay = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-N", "@plt$"])
    #expect(replay.status == 0 && replay.stderr.isEmpty, "\(replay.stderr)")
    // Unwound calls close at the catch, with their times, as uftrace shows them.
    #expect(!replay.stdout.contains("no exit recorded"), "\(replay.stdout)")
    let expected = [
      "main() {",
      "  throw_top() {", "    throw_mid() {", "      thrower();", "    }", "  }",
      "  into_catcher() {", "    catcher() {", "      thrower();", "    }", "  }",
      "  into_catcher() {", "    catcher() {", "      thrower();", "    }", "  }",
      "}",
    ]
    #expect(RecordCommandTests.trees(replay.stdout).values.first == expected, "\(replay.stdout)")
    #expect(try TestSupport.run(program, []).stdout == "202 -120 29\n")
  }
}

extension OptimizedProgramTests {
  /// Names come from the symbols saved with the trace: a program rebuilt after recording (clang
  /// writes no build-id here) replays with the names of what ran. Without the saved names, the
  /// reader says the file changed.
  @Test func aRebuiltProgramReplaysWithTheNamesThatRan() throws {
    let directory = try TestSupport.temporaryDirectory("optimized-rebuilt")
    let source = directory.appendingPathComponent("program.c")
    let program = directory.appendingPathComponent("program").path
    func build(_ text: String) throws {
      try text.write(to: source, atomically: true, encoding: .utf8)
      try TestSupport.compile(
        compiler: "clang", sources: [source.path], flags: ["-O1", "-fpatchable-function-entry=5"], output: program)
    }
    try build(
      """
      __attribute__((noinline)) int alpha(int x) { return x + 1; }
      __attribute__((noinline)) int beta(int x) { return alpha(x) * 2; }
      int main(void) { return beta(3) - 8; }
      """)
    let trace = directory.appendingPathComponent("trace")
    #expect(try RecordCommandTests.record(trace, [program]).status == 0)
    try build(
      """
      __attribute__((noinline)) int zed(int x) { return x + 5; }
      __attribute__((noinline)) int gamma2(int x) { return x + 1; }
      __attribute__((noinline)) int delta(int x) { return gamma2(x) * 2; }
      int main(void) { return delta(3) + zed(1) - 14; }
      """)
    let replay = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-N", "@plt$"])
    #expect(replay.stderr.isEmpty, "\(replay.stderr)")
    #expect(
      RecordCommandTests.trees(replay.stdout).values.first == ["main() {", "  beta() {", "    alpha();", "  }", "}"],
      "\(replay.stdout)")
    try FileManager.default.removeItem(at: trace.appendingPathComponent("symbols"))
    let unsaved = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path])
    #expect(unsaved.stderr.contains("program: it was modified after it was recorded"), "\(unsaved.stderr)")
  }
}

extension OptimizedProgramTests {
  /// A patchable shared library found through RUNPATH is traced with the program; a stripped
  /// program's functions are traced and named by address; a static program is refused.
  @Test func aLibraryAStrippedProgramAndAStaticOne() throws {
    let directory = try TestSupport.temporaryDirectory("optimized-library")
    let library = Self.programs.appendingPathComponent("library")
    try FileManager.default.createDirectory(
      at: directory.appendingPathComponent("lib"), withIntermediateDirectories: true)
    try TestSupport.compile(
      compiler: "clang", sources: [library.appendingPathComponent("tail_lib.c").path],
      flags: ["-O2", "-fPIC", "-shared", "-fpatchable-function-entry=5"],
      output: directory.appendingPathComponent("lib/libtail.so").path)
    let program = directory.appendingPathComponent("program").path
    try TestSupport.compile(
      compiler: "clang", sources: [library.appendingPathComponent("uses_lib.c").path],
      flags: [
        "-O2", "-fpatchable-function-entry=5", "-L", directory.appendingPathComponent("lib").path, "-ltail",
        "-Wl,-rpath,$ORIGIN/lib", "-Wl,--enable-new-dtags",
      ], output: program)
    let trace = try Self.recordAsUntraced(program, in: directory)
    // lib_entry is traced in its library: its PLT call is not shown as a library call too.
    let all = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path]).stdout
    #expect(all.contains("printf@plt();") && !all.contains("lib_entry@plt"), "\(all)")
    let replay = try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "-N", "@plt$"])
    let expected = ["main() {", "  local() {", "    lib_entry() {", "      lib_leaf();", "    }", "  }", "}"]
    #expect(RecordCommandTests.trees(replay.stdout).values.first == expected, "\(replay.stdout)")

    let stripped = directory.appendingPathComponent("stripped").path
    try FileManager.default.copyItem(atPath: program, toPath: stripped)
    #expect(try TestSupport.run(TestSupport.which("strip")!, [stripped]).status == 0)
    let strippedTrace = directory.appendingPathComponent("stripped-trace")
    #expect(try RecordCommandTests.record(strippedTrace, [stripped]).stdout == "10\n")
    let anonymous = try TestSupport.run(Self.tracery, ["replay", "-d", strippedTrace.path, "-N", "@plt$"])
    let lines = RecordCommandTests.trees(anonymous.stdout).values.first ?? []
    #expect(lines.count == 7 && lines[0].hasPrefix("stripped+0x") && lines[2] == "    lib_entry() {", "\(lines)")

    let fixed = directory.appendingPathComponent("static").path
    try TestSupport.compile(
      compiler: "clang",
      sources: [library.appendingPathComponent("uses_lib.c").path, library.appendingPathComponent("tail_lib.c").path],
      flags: ["-O2", "-static", "-fpatchable-function-entry=5"], output: fixed)
    let refused = try RecordCommandTests.record(directory.appendingPathComponent("static-trace"), [fixed])
    #expect(refused.status != 0 && refused.stderr.contains("is statically linked"), "\(refused.stderr)")
  }
}
