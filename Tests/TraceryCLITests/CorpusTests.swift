import Foundation
import Testing
import TraceryTestSupport

/// Real programs nobody here wrote, from Debian's source packages, built as their authors build
/// them (their own optimisation level) plus `-fpatchable-function-entry=5`, run on a real
/// workload untraced and under `tracery record`:
///
/// - the output and exit status are the same;
/// - every thread's calls nest (each exit closes the innermost open call; what stays open at the
///   end is one chain, the calls the process exited inside);
/// - every traced function's call count equals valgrind's callgrind count on the same binary
///   (callgrind counts every call exactly, a tail call included);
/// - under `-l` (the libraries' functions relocated and traced too) the same holds but the counts.
///
/// Counts are compared on single-threaded workloads: in zstd's multithreaded mode the counts of
/// 20-35 functions (the main thread's polling loop, per-worker contexts made on demand) depend on
/// how the threads are scheduled, and natively they are scheduled differently from under
/// valgrind, which runs one thread at a time. Its threaded workload is checked for the rest.
///
/// Sources come from `apt-get source` (a `deb-src` entry for the configured mirror is needed;
/// `.ci/run` adds one) and are built once into a cache (`TRACERY_CORPUS_CACHE`, else
/// `~/.cache/tracery-corpus`): later runs reuse the binaries.
@Suite struct CorpusTests {
  static let tracery = ListCommandTests.tracery

  struct Program: Sendable, CustomStringConvertible {
    /// The source package.
    let package: String
    /// Shell commands run in the unpacked source directory; they leave `binary` there.
    let build: String
    let binary: String
    /// Writes the workload's input into a directory and returns the arguments to run it there,
    /// and the files it writes (compared between runs). Its call counts are compared too.
    let workload: Workload
    /// A workload with threads, whose counts are not compared (see the type's comment).
    var threadedWorkload: Workload?
    var description: String { package }
  }

  typealias Workload = @Sendable (URL) throws -> (arguments: [String], outputs: [String])

  static let flags = "-fpatchable-function-entry=5"

  static let programs: [Program] = [
    Program(
      package: "gzip",
      build: "./configure -q CC=clang CFLAGS='-O2 \(flags)' >/dev/null && make -j2 -s >/dev/null",
      binary: "gzip",
      workload: { directory in
        try text(bytes: 900_000, seed: 7).write(to: directory.appendingPathComponent("input.txt"))
        return (["-9", "-k", "-f", "-n", "input.txt"], ["input.txt.gz"])
      }),
    Program(
      package: "libzstd",
      // zstd's own optimisation (-O3), its multithreaded command line program.
      build: "make -j2 -s -C programs zstd CC=clang MOREFLAGS='\(flags)' >/dev/null",
      binary: "programs/zstd",
      workload: { directory in
        try text(bytes: 1_000_000, seed: 11).write(to: directory.appendingPathComponent("input.txt"))
        return (["-q", "-f", "--single-thread", "-3", "input.txt", "-o", "output.zst"], ["output.zst"])
      },
      threadedWorkload: { directory in
        try text(bytes: 3_500_000, seed: 11).write(to: directory.appendingPathComponent("input.txt"))
        return (["-q", "-f", "-T2", "-B512KiB", "-3", "input.txt", "-o", "output.zst"], ["output.zst"])
      }),
    Program(
      package: "ninja-build",
      // Its own bootstrap (-O2, C++); valgrind 3.19 cannot read clang's DWARF 5, so the debug
      // information goes (the code stays as built).
      build:
        "CXX=clang++ CFLAGS='\(flags)' python3 configure.py --bootstrap >/dev/null 2>&1 && strip --strip-debug ninja",
      binary: "ninja",
      workload: { directory in
        var manifest = "rule cc\n  command = cc -c $in -o $out\n  description = CC $out\n"
        manifest += "rule link\n  command = ld $in -o $out\n"
        try FileManager.default.createDirectory(
          at: directory.appendingPathComponent("src"), withIntermediateDirectories: true)
        for index in 0..<150 {
          try Data().write(to: directory.appendingPathComponent("src/f\(index).c"))
          manifest += "build obj/f\(index).o: cc src/f\(index).c\(index % 10 == 0 ? "" : " | obj/f\(index - 1).o")\n"
        }
        manifest += "build app: link " + (0..<150).map { "obj/f\($0).o" }.joined(separator: " ") + "\ndefault app\n"
        try manifest.write(to: directory.appendingPathComponent("build.ninja"), atomically: true, encoding: .utf8)
        // A dry run: the manifest parsed, the graph built and walked, no command spawned.
        return (["-n", "-j1"], [])
      }),
  ]

  /// Deterministic text of about `bytes` bytes: words from a small vocabulary, with numbers.
  static func text(bytes: Int, seed: UInt64) -> Data {
    var state = seed
    func next() -> UInt64 {
      state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
      return state >> 33
    }
    let vocabulary = (0..<500).map { _ in
      String((0..<(2 + Int(next() % 8))).map { _ in Character(Unicode.Scalar(UInt8(97 + next() % 16))) })
    }
    var result = ""
    result.reserveCapacity(bytes + 16)
    var count = 0
    while result.utf8.count < bytes {
      result += vocabulary[Int(next() % 500)]
      result += count % 7 == 0 ? " \(count) " : " "
      count += 1
    }
    return Data(result.utf8)
  }

  static var cache: URL {
    if let path = ProcessInfo.processInfo.environment["TRACERY_CORPUS_CACHE"] { return URL(fileURLWithPath: path) }
    return FileManager.default.homeDirectoryForCurrentUser.appendingPathComponent(".cache/tracery-corpus")
  }

  static func shell(_ command: String, in directory: URL) throws -> TestSupport.ProcessResult {
    try TestSupport.run("/bin/sh", ["-c", "cd '\(directory.path)' && \(command)"])
  }

  /// The built binary of `program`, from the cache or fetched and built now.
  static func binary(_ program: Program) throws -> String {
    let home = cache.appendingPathComponent(program.package)
    let source = home.appendingPathComponent("source")
    let binary = source.appendingPathComponent(program.binary).path
    if FileManager.default.fileExists(atPath: binary),
      (try? String(contentsOf: home.appendingPathComponent("build-command"), encoding: .utf8)) == program.build
    {
      return binary
    }
    try? FileManager.default.removeItem(at: home)
    let download = home.appendingPathComponent("download")
    try FileManager.default.createDirectory(at: download, withIntermediateDirectories: true)
    // The newest version, else an older one the mirror still has (a mirror without the
    // security archive's sources answered 404 for libzstd's update).
    let package = program.package
    let fetched = try shell(
      "apt-get source --download-only -qq \(package) 2>&1 || { for version in $(apt-cache showsrc \(package)"
        + " | sed -n 's/^Version: //p' | sort -rV); do rm -f ./*; apt-get source --download-only -qq"
        + " \(package)=$version 2>&1 && exit 0; done; exit 1; }", in: download)
    guard fetched.status == 0 else {
      throw TestSupport.CompileError(
        description: "apt-get source \(program.package) failed (a deb-src entry is needed; .ci/run adds one):\n"
          + fetched.stdout)
    }
    // The upstream sources as released (Debian's patches would make autotools regenerate files).
    let unpacked = try shell("dpkg-source -q --skip-patches -x *.dsc '\(source.path)' 2>&1", in: download)
    guard unpacked.status == 0 else { throw TestSupport.CompileError(description: unpacked.stdout) }
    let built = try shell(program.build + " 2>&1", in: source)
    guard built.status == 0, FileManager.default.fileExists(atPath: binary) else {
      throw TestSupport.CompileError(description: "building \(program.package) failed:\n\(built.stdout.suffix(3000))")
    }
    try program.build.write(to: home.appendingPathComponent("build-command"), atomically: true, encoding: .utf8)
    return binary
  }

  /// Entry counts per symbol from `dump --demangle no`, and whether every thread's calls nest.
  static func recorded(_ trace: URL) throws -> (counts: [String: Int], nesting: [String]) {
    let dump = try TestSupport.run(tracery, ["dump", "-d", trace.path, "--demangle", "no"])
    guard dump.status == 0, dump.stderr.isEmpty else {
      throw TestSupport.CompileError(description: "dump: \(dump.stderr)")
    }
    var counts: [String: Int] = [:]
    var problems: [String] = []
    // Per thread: the depths of the open calls (a fork child's first events may start deeper).
    var open: [String: [Int]] = [:]
    for raw in dump.stdout.split(separator: "\n") where !raw.hasPrefix("#") {
      // "TIMESTAMP TID [entry] depth D NAME", "TIMESTAMP TID [exit ] depth D NAME"
      let line = raw.replacingOccurrences(of: "[exit ]", with: "[exit]")
      let fields = line.split(separator: " ", maxSplits: 5)
      guard fields.count == 6, let depth = Int(fields[4]) else { continue }
      let tid = String(fields[1])
      var stack = open[tid] ?? []
      if fields[2] == "[entry]" {
        counts[String(fields[5]), default: 0] += 1
        if let top = stack.last, depth != top + 1 { problems.append("\(line): entered at depth \(depth) under \(top)") }
        stack.append(depth)
      } else if stack.last == depth {
        stack.removeLast()
      } else {
        problems.append("\(line): exit at depth \(depth), open: \(stack.suffix(3))")
      }
      open[tid] = stack
    }
    return (counts, problems)
  }

  /// Calls per function as callgrind counts them (`calls=` lines under each `cfn=`), with
  /// recursion levels (`name'2`) folded together.
  static func callgrind(_ binary: String, _ arguments: [String], in directory: URL) throws -> [String: Int] {
    let output = directory.appendingPathComponent("callgrind.out").path
    let command =
      [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=\(output)", "--compress-strings=no", "--compress-pos=no",
        "--demangle=no", binary,
      ] + arguments
    let result = try shell(command.map { "'\($0)'" }.joined(separator: " ") + " 2>&1", in: directory)
    guard result.status == 0 else {
      throw TestSupport.CompileError(description: "callgrind: \(result.stdout.suffix(2000))")
    }
    var counts: [String: Int] = [:]
    var callee: String?
    for line in try String(contentsOfFile: output, encoding: .utf8).split(separator: "\n") {
      if line.hasPrefix("cfn=") {
        var name = line.dropFirst(4)
        if let quote = name.lastIndex(of: "'"), name[name.index(after: quote)...].allSatisfy(\.isNumber) {
          name = name[..<quote]
        }
        callee = String(name)
      } else if line.hasPrefix("calls="), let callee, let count = Int(line.dropFirst(6).prefix { $0 != " " }) {
        counts[callee, default: 0] += count
      }
    }
    return counts
  }

  /// Runs `workload` untraced and recorded in fresh directories under `work`; checks that the
  /// output, status and written files are the same and that every thread's calls nest. Returns
  /// the trace, the entry counts and the times.
  static func recordAsUntraced(
    _ binary: String, _ workload: Workload, in work: URL, name: String, options: [String] = []
  ) throws -> (trace: URL, counts: [String: Int], untraced: Double, traced: Double) {
    let trace = work.appendingPathComponent("\(name)-trace")
    func run(traced: Bool) throws -> (result: TestSupport.ProcessResult, outputs: [Data], seconds: Double) {
      let directory = work.appendingPathComponent("\(name)-\(traced ? "traced" : "untraced")")
      try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
      let (arguments, outputs) = try workload(directory)
      let record = "'\(tracery)' record -d '\(trace.path)' " + options.map { "'\($0)' " }.joined()
      let command = traced ? record + "-- '\(binary)' " : "'\(binary)' "
      let start = Date()
      let result = try shell(command + arguments.map { "'\($0)'" }.joined(separator: " "), in: directory)
      let seconds = Date().timeIntervalSince(start)
      return (result, try outputs.map { try Data(contentsOf: directory.appendingPathComponent($0)) }, seconds)
    }
    let untraced = try run(traced: false)
    let traced = try run(traced: true)
    #expect(traced.result.status == untraced.result.status, "\(name)")
    #expect(traced.result.stdout == untraced.result.stdout, "\(name)")
    #expect(traced.outputs == untraced.outputs, "\(name): the files the program wrote")
    #expect(untraced.outputs.allSatisfy { !$0.isEmpty })
    let (counts, nesting) = try recorded(trace)
    #expect(nesting.isEmpty, "\(name): \(nesting.prefix(5))")
    let replay = try TestSupport.run(tracery, ["replay", "-d", trace.path])
    #expect(replay.status == 0 && replay.stderr.isEmpty, "\(replay.stderr)")
    return (trace, counts, untraced.seconds, traced.seconds)
  }

  @Test(arguments: programs)
  func aRealProgramRecordsAsItRunsWithExactCallCounts(program: Program) throws {
    let binary = try Self.binary(program)
    let work = try TestSupport.temporaryDirectory("corpus-\(program.package)")
    let run = try Self.recordAsUntraced(binary, program.workload, in: work, name: "counted")
    if let threaded = program.threadedWorkload {
      let many = try Self.recordAsUntraced(binary, threaded, in: work, name: "threaded")
      let info = try TestSupport.run(Self.tracery, ["info", "-d", many.trace.path]).stdout
      #expect(
        info.contains("threads   : 3") || info.contains("threads   : 4") || info.contains("threads   : 5"), "\(info)")
    }

    // -l: the C library's functions (and libstdc++'s) traced too, relocated, under the same
    // checks: output, status, files, nesting, a clean replay.
    let nested = try Self.recordAsUntraced(binary, program.workload, in: work, name: "nested", options: ["-l"])
    #expect(nested.counts["__libc_start_main"] == 1, "\(nested.counts.keys.sorted().prefix(20))")
    // Library calls are recorded by default (`NAME@plt`); with -l the library functions they
    // call are traced themselves, and their calls are not shown twice.
    #expect(run.counts.keys.contains { $0.hasSuffix("@plt") }, "\(run.counts.keys.sorted().prefix(20))")
    let programFunctions = run.counts.keys.filter { !$0.hasSuffix("@plt") }.count
    #expect(nested.counts.count > programFunctions + 30, "\(nested.counts.count) against \(programFunctions)")

    // Symbols that share an address (a constructor's C1 and C2) are one function: callgrind
    // names it by one of them, the trace by another.
    let functions = try Binutils.functions(binary)
    let aliases = Dictionary(functions.map { ($0.address, $0.name) }, uniquingKeysWith: { min($0, $1) })
    let canonical = Dictionary(functions.map { ($0.name, aliases[$0.address]!) }, uniquingKeysWith: { a, _ in a })
    func folded(_ counts: [String: Int]) -> [String: Int] {
      counts.reduce(into: [:]) { $0[canonical[$1.key] ?? $1.key, default: 0] += $1.value }
    }
    // Callgrind counts a library function's calls from anywhere, not those through the program's PLT.
    let ours = folded(run.counts.filter { !$0.key.hasSuffix("@plt") })
    let directory = work.appendingPathComponent("callgrind")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    let (arguments, _) = try program.workload(directory)
    let expected = folded(try Self.callgrind(binary, arguments, in: directory))
    let mismatches = ours.keys.sorted().filter { ours[$0] != expected[$0] }.map {
      "\($0): \(ours[$0]!) recorded, \(expected[$0] ?? 0) by callgrind"
    }
    #expect(mismatches.isEmpty, "\(mismatches.prefix(10))")
    #expect(ours.count >= 30, "only \(ours.count) functions compared")
    let calls = ours.values.reduce(0, +)
    let size = try FileManager.default.contentsOfDirectory(atPath: run.trace.path).reduce(0) { total, name in
      let attributes = try? FileManager.default.attributesOfItem(atPath: run.trace.appendingPathComponent(name).path)
      return total + (attributes?[.size] as? Int ?? 0)
    }
    print(
      "corpus | \(program.package) | untraced \(Int(run.untraced * 1000)) ms | traced \(Int(run.traced * 1000)) ms | "
        + "\(calls) calls | trace \(size / 1024) KiB | \(ours.count) functions | counts equal "
        + (mismatches.isEmpty ? "y" : "n"))
  }
}
