import Foundation
import Testing
import TraceryTestSupport

/// `tracery record` on programs built without any patch-site flag (as most programs ship): the
/// program's functions are traced by moving their first instructions out of line (`--relocate`,
/// which a program without a patch site of its own gets without asking).
@Suite struct RelocatedRecordTests {
  @Test(arguments: [("gcc", ["-fomit-frame-pointer"]), ("clang", ["-fcf-protection=full"])])
  func programsWithoutNopsAreRecordedWithRelocate(compiler: String, flags: [String]) throws {
    let directory = try TestSupport.temporaryDirectory("record-relocate")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "tails", compiler: compiler, flags: ["-O2", "-pthread"] + flags, in: directory)
    let untraced = try TestSupport.run(program, [])
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program], options: ["--relocate"])
    #expect(traced.status == untraced.status, "\(traced.stderr)")
    #expect(traced.stdout == untraced.stdout)
    // Every recorded function was entered as often as callgrind counts it.
    let counts = try RecordCommandTests.recordedCounts(trace)
    let expected = try CorpusTests.callgrind(program, [], in: directory)
    // (gcc's worker is a 2-byte `jmp leaf` followed by padding: it moves whole.)
    for name in ["main", "leaf", "mid", "top", "even", "odd", "worker"] {
      #expect(counts[name] != nil, "\(name) was not recorded: \(counts.keys.sorted())")
    }
    // (Library calls, `NAME@plt`, are recorded by default; callgrind counts a library function's
    // calls from anywhere.)
    for (name, count) in counts where !name.hasSuffix("@plt") {
      #expect(expected[name] == count, "\(name): recorded \(count), callgrind \(expected[name] ?? 0)")
    }
    // Without --relocate: the same (the program has no patch site of its own), and `info` says so.
    let unasked = directory.appendingPathComponent("unasked")
    let again = try RecordCommandTests.record(unasked, [program])
    #expect(again.status == untraced.status && again.stdout == untraced.stdout, "\(again.stderr)")
    #expect(try RecordCommandTests.recordedCounts(unasked) == counts)
    let info = try String(contentsOf: unasked.appendingPathComponent("info"), encoding: .utf8)
    #expect(info.contains("relocate yes"), "\(info)")
  }

  /// A program without patch sites is relocated, and so is any process it starts whose program
  /// has none; a child that has sites is traced through them only, as it is when recorded itself
  /// (before, it relocated its functions without a site too). Both record their calls.
  @Test func eachProcessDecidesRelocationForItsOwnProgram() throws {
    let directory = try TestSupport.temporaryDirectory("record-relocate-children")
    defer { try? FileManager.default.removeItem(at: directory) }
    let parent = directory.appendingPathComponent("parent.c").path
    let child = directory.appendingPathComponent("child.c").path
    try """
    #include <spawn.h>
    #include <sys/wait.h>
    extern char **environ;
    __attribute__((noinline)) int launch(char *path) {
      pid_t pid;
      char *argv[] = {path, 0};
      int status = 0;
      if (posix_spawn(&pid, path, 0, 0, argv, environ) != 0) return 1;
      waitpid(pid, &status, 0);
      return status;
    }
    int main(int argc, char **argv) { return argc > 1 ? launch(argv[1]) : 2; }
    """.write(toFile: parent, atomically: true, encoding: .utf8)
    try "__attribute__((noinline)) int work(int x) { return x + 1; }\nint main(void) { return work(-1); }\n".write(
      toFile: child, atomically: true, encoding: .utf8)
    try TestSupport.compile(
      compiler: "gcc", sources: [parent], flags: ["-O2"], output: directory.appendingPathComponent("parent").path)
    try TestSupport.compile(
      compiler: "gcc", sources: [child], flags: ["-O2", "-fpatchable-function-entry=5"],
      output: directory.appendingPathComponent("child").path)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(
      trace, [directory.appendingPathComponent("parent").path, directory.appendingPathComponent("child").path])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    var relocated: [String: Int] = [:]
    for name in try FileManager.default.contentsOfDirectory(atPath: trace.path) where name.hasPrefix("process-") {
      let text = try String(contentsOf: trace.appendingPathComponent(name), encoding: .utf8)
      let program = text.split(separator: "\n").first { $0.hasPrefix("executable ") }.map {
        $0.split(separator: "/").last!
      }
      let count = text.split(separator: "\n").first { $0.hasPrefix("relocated-functions ") }.flatMap {
        Int($0.split(separator: " ").last!)
      }
      // (No line: nothing was relocated.)
      relocated[program.map(String.init) ?? "?"] = count ?? 0
    }
    #expect(relocated["child"] == 0 && (relocated["parent"] ?? 0) > 0, "\(relocated)")
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["launch"] == 1 && counts["work"] == 1, "\(counts)")
  }

  /// gcc -O2 callers rely on more than the ABI promises of a callee built without patch sites
  /// (`registers.c`): -fipa-ra keeps their values in call-clobbered registers the callee does not
  /// touch, and -fipa-stack-alignment calls it with rsp not 16-byte aligned. Recorded, with and
  /// without argument and return values, the program prints what it prints untraced (before
  /// images for such functions preserved every register, the recorder's r10/r11 made it print a
  /// wrong sum and -A/-R were refused; a handler or the refill called on the unaligned stack
  /// crashed it).
  @Test func callersThatKeepValuesInScratchRegistersAreUnharmed() throws {
    let directory = try TestSupport.temporaryDirectory("record-registers")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program("registers", flags: ["-O2"], in: directory)
    // The hazards are in the binary: mix keeps r10 and r11 across its calls; fmix has no frame.
    let code = try TestSupport.run("/usr/bin/objdump", ["-d", "--no-show-raw-insn", program]).stdout
    func body(_ name: String) -> String {
      guard let start = code.range(of: "<\(name)>:\n") else { return "" }
      return String(code[start.upperBound...]).components(separatedBy: "\n\n")[0]
    }
    let mix = body("mix")
    let fmix = body("fmix")
    try #require(mix.contains("%r10d") && mix.contains("%r11d") && !mix.contains("%r10d,0x"), "\(mix)")
    try #require(fmix.contains("call") && !fmix.contains("push") && !fmix.contains(",%rsp"), "\(fmix)")
    // 3,000 rounds of fmix: 840,000 calls of fleaf fill the recorder's chunks, so the refill is
    // called from fleaf's unaligned entry and return too.
    for (name, arguments, options) in [
      ("plain", ["3000"], ["--relocate"]),
      (
        "values", [],
        ["--relocate", "-A", "leaf@arg1", "-R", "leaf@retval", "-A", "fleaf@fparg1", "-R", "fleaf@retval/f"]
      ),
    ] {
      let untraced = try TestSupport.run(program, arguments)
      #expect(untraced.status == 0 && untraced.stdout.hasPrefix("3529554220 "), "\(untraced.stdout)")
      let trace = directory.appendingPathComponent(name)
      let traced = try RecordCommandTests.record(trace, [program] + arguments, options: options)
      #expect(traced.status == 0, "\(name): \(traced.stderr)")
      #expect(traced.stdout == untraced.stdout, "\(name)")
      if name == "plain" {
        let counts = try RecordCommandTests.recordedCounts(trace)
        #expect(counts["leaf"] == 1300 && counts["fleaf"] == 840_000, "\(counts)")
      } else {
        let replay = try TestSupport.run(OptimizedProgramTests.tracery, ["replay", "-d", trace.path]).stdout
        #expect(replay.contains("fleaf(1.25) = 0.875;"), "\(replay.prefix(2000))")
        #expect(replay.contains("leaf(8) = 4055616904;"), "\(replay.prefix(2000))")
      }
    }
  }

  /// A function that cannot be relocated (its loop branches into its first bytes) is traced
  /// through an int3 (`PatchSite.Shape.trap`), also in a thread that blocks every signal: the
  /// agent keeps SIGTRAP out of the sets the program blocks (without that, the kernel kills the
  /// program at the first trap). One shorter than the branch but followed by padding moves whole
  /// (`X86Relocator.isPadding`: gcc's cc1 had 919 such functions behind int3s, hot ones among
  /// them; a later cc1 in a trace 442 → 345 ms). One with another function right after it traps
  /// while that function is relocated in the same batch: a request owns only the bytes it changes
  /// (before, the trap's request put the neighbour's first byte back: "read-back does not match").
  @Test func functionsThatCannotMoveAreTracedThroughATrap() throws {
    let directory = try TestSupport.temporaryDirectory("record-trap")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program("masked", flags: ["-O2", "-pthread"], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program], options: ["--relocate"])
    #expect(traced.status == 0, "\(traced.stderr)")
    #expect(traced.stdout == "1498501\n")
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(
      counts["tiny"] == 1001 && counts["loops"] == 1000 && counts["packed"] == 1000 && counts["worker"] == 1
        && counts["main"] == 1, "\(counts)")
    // `tiny`, as short as `packed`, is followed by padding and moves whole.
    let info = try TestSupport.run(OptimizedProgramTests.tracery, ["info", "-d", trace.path]).stdout
    #expect(info.contains("2 through an int3") && !info.contains("untraced"), "\(info)")
    let listed = try TestSupport.run(OptimizedProgramTests.tracery, ["list", "--relocate", program]).stdout
    let shapes = Dictionary(
      listed.split(separator: "\n").compactMap { line -> (String, String)? in
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        guard fields.count >= 3, let name = fields.last else { return nil }
        return (String(name), String(fields[1]))
      }, uniquingKeysWith: { first, _ in first })
    #expect(
      shapes["tiny"] == "moved" && shapes["loops"] == "int3" && shapes["packed"] == "int3"
        && shapes["neighbour"] == "moved", "\(listed)")
  }

  /// 256-bit arguments and results keep their upper halves: the recorder's refill runs Swift and
  /// libc code (AVX routines end in `vzeroupper`) between a caller and the body, and keeps the
  /// whole vector state (`xsave`) around it, for functions with a patch site and relocated ones.
  @Test(.enabled(if: hasAVX2), arguments: [["-fpatchable-function-entry=5"], []])
  func wideVectorsSurviveTheRefill(flags: [String]) throws {
    let directory = try TestSupport.temporaryDirectory("record-wide")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program("wide", flags: ["-O2", "-mavx2"] + flags, in: directory)
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program])
    #expect(traced.status == 0, "\(traced.stderr)")
    #expect(traced.stdout == "2000000 4000000 6000000 8000000\n")
    #expect(try RecordCommandTests.recordedCounts(trace)["add"] == 2_000_000)
  }

  static let hasAVX2 = ((try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? "").contains(" avx2")

  /// A function no call frame describes, in an object whose compiled functions all have one, is
  /// hand-written or generated code (node's V8 builtins: traced, node stopped at the graph's
  /// `ud2`, their returns not a function's): neither relocated nor trapped, and said why.
  @Test func aFunctionWithoutCallFrameIsLeftAlone() throws {
    let directory = try TestSupport.temporaryDirectory("record-handmade")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program("handmade", flags: ["-O2"], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program], options: ["--no-libcall"])
    #expect(traced.status == 0 && traced.stdout == "42\n", "\(traced.stderr)")
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["compiled"] == 1 && counts["main"] == 1 && counts["handmade"] == nil, "\(counts)")
    let listed = try TestSupport.run(OptimizedProgramTests.tracery, ["list", "--relocate", program]).stdout
    let line = listed.split(separator: "\n").first { $0.hasSuffix(" handmade") } ?? ""
    #expect(line.contains("no call frame describes it"), "\(listed)")
  }

  /// A program's own SIGTRAP handler (LLVM-based programs install one at start: clang died at its
  /// first call through an int3 site) is kept beside the tracer's: the program's traps reach it,
  /// it reads back what it set, and the int3 sites still work.
  @Test func aProgramsOwnTrapHandlerAndTheTrapSitesLiveSideBySide() throws {
    let directory = try TestSupport.temporaryDirectory("record-own-trap")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program("ownstrap", flags: ["-O2"], in: directory)
    let untraced = try TestSupport.run(program, [])
    #expect(untraced.stdout == "traps 3 sum 499500 mine 1 1\n", "\(untraced.stdout)")
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program])
    #expect(traced.status == 0, "\(traced.stderr)")
    #expect(traced.stdout == untraced.stdout)
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["tiny"] == 1000 && counts["main"] == 1, "\(counts)")
    let info = try TestSupport.run(OptimizedProgramTests.tracery, ["info", "-d", trace.path]).stdout
    #expect(info.contains("through an int3"), "\(info)")
  }

  /// A Swift program built as it ships (`swiftc -O`; swiftc has no patchable-entry flag): its
  /// functions are recorded with Swift names, and it prints what it prints untraced (its three-
  /// word return, its thrown error, its task group). Its async functions too: each of the four
  /// tasks' `work` has its entry and its exit (async functions return with `ret 8`; before, the
  /// program stopped at the graph's corrupt-shadow-stack `ud2`, and they were left out), and so
  /// do its closures and the continuations they tail-call.
  @Test func aSwiftProgramIsRecordedWithSwiftNames() throws {
    let directory = try TestSupport.temporaryDirectory("record-swift")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.swiftDemo(in: directory)
    let untraced = try TestSupport.run(program, [])
    #expect(untraced.status == 0 && untraced.stdout.contains("triple 3 2 1"), "\(untraced.stdout)")
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program], options: ["--relocate"])
    #expect(traced.status == 0, "\(traced.stderr)")
    #expect(traced.stdout == untraced.stdout)
    let counts = try RecordCommandTests.recordedCounts(trace)
    for (name, count) in [
      ("swiftdemo.total(Swift.Array<swiftdemo.Shape>) -> Swift.Double", 1),
      ("swiftdemo.checkEven(Swift.Int) throws -> Swift.Int", 2),
      ("swiftdemo.triple(Swift.Int, Swift.Int, Swift.Int) -> (Swift.Int, Swift.Int, Swift.Int)", 1),
    ] {
      #expect(counts[name] == count, "\(name): \(counts[name] ?? 0) (recorded: \(counts.keys.sorted()))")
    }
    let work = "swiftdemo.work(Swift.Int) async -> Swift.Int"
    #expect(counts[work] == 4, "\(counts.keys.sorted())")
    let dump = try TestSupport.run(OptimizedProgramTests.tracery, ["dump", "-d", trace.path, "--demangle", "full"])
    let exits = dump.stdout.split(separator: "\n").filter { $0.contains("[exit ]") }
    #expect(exits.filter { $0.hasSuffix(" " + work) }.count == 4)
    // The task group's closure and a continuation of it (a partial function), entered and left.
    let parts = ["closure #2 (inout Swift.TaskGroup<Swift.Int>) async", "await resume partial function for closure #1"]
    for part in parts {
      #expect(counts.keys.contains { $0.contains(part) }, "\(part): \(counts.keys.sorted())")
      #expect(exits.contains { $0.contains(part) }, "\(part)")
    }
  }

  /// A Swift program that uses concurrency as programs do (Programs/asyncmix.swift: a task group,
  /// an actor, continuations, an AsyncStream, `async let`, Task.sleep, thrown errors) prints what
  /// it prints untraced, recorded with every function of every library it loads (`--patch '*'`:
  /// the concurrency runtime's executors, task switches and continuations too), and its async
  /// functions' entries and exits pair up: each of the 20 tasks' `viaContinuation` has both.
  @Test func aSwiftConcurrencyProgramIsRecordedWithItsLibraries() throws {
    let directory = try TestSupport.temporaryDirectory("record-swift-async")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "asyncmix", compiler: "swiftc", flags: ["-O", "-parse-as-library"], in: directory)
    let untraced = try TestSupport.run(program, [])
    #expect(untraced.status == 0 && untraced.stdout == "total 560507 recurse 288598 count 20\n", "\(untraced.stdout)")
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program], options: ["--patch", "*"])
    #expect(traced.status == 0, "\(traced.stderr)")
    #expect(traced.stdout == untraced.stdout)
    let dump = try TestSupport.run(OptimizedProgramTests.tracery, ["dump", "-d", trace.path, "--demangle", "full"])
    // "TIMESTAMP TID [KIND ] depth D NAME": (kind, name).
    let events = dump.stdout.split(separator: "\n").compactMap { line -> (String, String)? in
      guard let close = line.range(of: "] depth "), let open = line.firstIndex(of: "[") else { return nil }
      let rest = line[close.upperBound...]
      guard let space = rest.firstIndex(of: " ") else { return nil }
      let kind = line[line.index(after: open)..<close.lowerBound].trimmingCharacters(in: .whitespaces)
      return (kind, String(rest[rest.index(after: space)...]))
    }
    let name = "asyncmix.viaContinuation(Swift.Int) async -> Swift.Int"
    #expect(events.filter { $0 == ("entry", name) }.count == 20)
    #expect(events.filter { $0 == ("exit", name) }.count == 20)
    // The runtime's own functions were recorded (its task switch, by its symbol name).
    #expect(events.contains { $0.1 == "swift_task_switch" }, "\(events.count) events")
  }

  /// The toolchain's own SwiftPM (`swift package describe`: 250,000 functions, async
  /// throughout, a manifest compiled by child processes) describes a package as it does
  /// untraced. Its tail calls to callees with fewer stack arguments move the return address
  /// (before, a frame was dropped as stale and the program stopped at the graph's
  /// corrupt-shadow-stack `ud2`). Under TRACERY_LONG_TESTS only: with the debug agent the test
  /// build uses, its start-up alone takes minutes (12 s in all with a release build).
  @Test(.enabled(if: TestSupport.longTests)) func theSwiftPackageManagerDescribesAPackage() throws {
    let swiftPackage = try #require(TestSupport.which("swift-package"), "the toolchain's swift-package")
    let directory = try TestSupport.temporaryDirectory("record-swiftpm")
    defer { try? FileManager.default.removeItem(at: directory) }
    let package = directory.appendingPathComponent("hello")
    let sources = package.appendingPathComponent("Sources/hello")
    try FileManager.default.createDirectory(at: sources, withIntermediateDirectories: true)
    try
      "// swift-tools-version:5.9\nimport PackageDescription\nlet package = Package(name: \"hello\", targets: [.executableTarget(name: \"hello\")])\n"
      .write(to: package.appendingPathComponent("Package.swift"), atomically: true, encoding: .utf8)
    try "print(\"hi\")\n".write(to: sources.appendingPathComponent("main.swift"), atomically: true, encoding: .utf8)
    let arguments = [swiftPackage, "--package-path", package.path, "describe"]
    let untraced = try TestSupport.run(arguments[0], Array(arguments.dropFirst()))
    #expect(untraced.status == 0 && untraced.stdout.contains("Name: hello"), "\(untraced.stdout)\(untraced.stderr)")
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, arguments)
    #expect(traced.status == 0, "\(traced.stderr)")
    #expect(traced.stdout == untraced.stdout)
  }

  /// A program exactly as Debian ships it: /usr/bin/gzip, stripped (no .symtab) and built without
  /// patch-site flags. Its functions come from its call frames (named `gzip+0xADDRESS`); it
  /// compresses as untraced, and every recorded function was entered as often as callgrind
  /// counts calls of the function at that address — more for functions some `jmp` enters (a
  /// tail call: an entry Tracery records, which callgrind, knowing no functions of a stripped
  /// program, counts as a jump inside the caller; objdump lists those jumps).
  @Test func aStrippedDistributionProgramIsRecorded() throws {
    let (gzip, directory, input) = try Self.distributionGzip("record-stripped", bytes: 300_000, seed: 5)
    defer { try? FileManager.default.removeItem(at: directory) }
    let untraced = try TestSupport.run(gzip, ["-9", "-c", "-n", input.path])
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [gzip, "-9", "-c", "-n", input.path], options: ["--relocate"])
    #expect(traced.status == 0 && untraced.status == 0, "\(traced.stderr)")
    #expect(traced.stdout == untraced.stdout)
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts.count >= 20, "\(counts)")
    let expected = try CorpusTests.callgrind(gzip, ["-9", "-c", "-n", input.path], in: directory)
    let disassembly = try TestSupport.run("/usr/bin/objdump", ["-d", "--no-show-raw-insn", gzip]).stdout
    let jumpedTo = Set(
      disassembly.split(separator: "\n").compactMap { line -> UInt64? in
        let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
        guard fields.count >= 3, fields[1] == "jmp" else { return nil }
        return UInt64(fields[2], radix: 16)
      })
    var tailCalled = 0
    for (name, count) in counts where !name.hasSuffix("@plt") {
      let address = try #require(name.split(separator: "+0x").last.flatMap { UInt64($0, radix: 16) }, "\(name)")
      let hex = String(address, radix: 16)
      let calls = expected["0x" + String(repeating: "0", count: 16 - hex.count) + hex] ?? 0
      if jumpedTo.contains(address) {
        tailCalled += 1
        #expect(count >= calls, "\(name): recorded \(count), callgrind \(calls)")
      } else {
        #expect(count == calls, "\(name): recorded \(count), callgrind \(calls)")
      }
    }
    #expect(tailCalled < counts.count / 2)
  }

  /// Debian's gzip as it ships (stripped, no patch sites), a new directory and a text to
  /// compress in it.
  static func distributionGzip(_ name: String, bytes: Int, seed: UInt64) throws -> (String, URL, URL) {
    let gzip = "/usr/bin/gzip"
    try #require(FileManager.default.isExecutableFile(atPath: gzip))
    let directory = try TestSupport.temporaryDirectory(name)
    let input = directory.appendingPathComponent("input.txt")
    try CorpusTests.text(bytes: bytes, seed: seed).write(to: input)
    return (gzip, directory, input)
  }

  /// A stripped program started twice in one trace (by a shell, itself stripped): its code is
  /// swept for entry points once, by the first process, and kept beside the symbol files
  /// (`symbols/*.entries`, one per program); the second process reads them and traces the same
  /// functions in the same way.
  @Test func aProgramStartedTwiceSweepsItsCodeOnce() throws {
    let (gzip, directory, input) = try Self.distributionGzip("record-twice", bytes: 50_000, seed: 7)
    defer { try? FileManager.default.removeItem(at: directory) }
    let trace = directory.appendingPathComponent("trace")
    let command = "\(gzip) -c -n \(input.path) | wc -c; \(gzip) -c -n \(input.path) | wc -c"
    let traced = try RecordCommandTests.record(trace, ["/bin/sh", "-c", command], options: ["--relocate"])
    #expect(traced.status == 0, "\(traced.stderr)")
    let sizes = traced.stdout.split(separator: "\n")
    #expect(sizes.count == 2 && sizes[0] == sizes[1], "\(traced.stdout)")
    let kept = try FileManager.default.contentsOfDirectory(atPath: trace.appendingPathComponent("symbols").path)
      .filter { $0.hasSuffix(".entries") }
    // sh, gzip and wc: one file each, whatever the number of processes.
    #expect(kept.count == 3, "\(kept)")
    let processes = try FileManager.default.contentsOfDirectory(atPath: trace.path).filter { $0.hasPrefix("process-") }
    let gzips = try processes.map { try String(contentsOfFile: trace.appendingPathComponent($0).path, encoding: .utf8) }
      .filter { $0.contains("executable \(gzip)\n") }
    #expect(gzips.count == 2)
    func shapes(_ text: String) -> [Substring] {
      text.split(separator: "\n").filter { $0.hasPrefix("traced-functions") || $0.hasPrefix("relocated-functions") }
    }
    #expect(
      gzips.count == 2 && shapes(gzips[0]) == shapes(gzips[1]) && !shapes(gzips[0]).isEmpty, "\(gzips.map(shapes))")
  }

  /// `--patch GLOB` with relocation reaches the libraries' functions too: the C library's
  /// `qsort` (and `qsort_r`, which it calls) are recorded around the program's comparison
  /// function, called as often as the program counts; so are a plugin's, `dlopen`ed later (and
  /// again after a `dlclose`). Then every function of every library
  /// (`--patch '*'`, some 2,800 of the C library's, libstdc++'s for C++) under programs that
  /// `longjmp` to a `setjmp`, start threads, fork, and throw C++ exceptions: each prints what it
  /// prints untraced.
  @Test func patchReachesLibraryFunctions() throws {
    let directory = try TestSupport.temporaryDirectory("record-libraries")
    defer { try? FileManager.default.removeItem(at: directory) }
    let sorts = try RecordCommandTests.program("sorts", flags: ["-O2"], in: directory)
    let untraced = try TestSupport.run(sorts, [])
    let compared = try #require(
      Int(untraced.stdout.split(separator: " ").last?.trimmingCharacters(in: .newlines) ?? ""))
    let trace = directory.appendingPathComponent("trace-sorts")
    let traced = try RecordCommandTests.record(trace, [sorts], options: ["--patch", "*sort*"])
    #expect(traced.status == 0 && traced.stdout == untraced.stdout, "\(traced.stderr)")
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["sort_numbers"] == 1 && counts["qsort"] == 1 && counts["sort_compare"] == compared, "\(counts)")
    let replay = try TestSupport.run(OptimizedProgramTests.tracery, ["replay", "-d", trace.path]).stdout
    #expect(replay.contains("sort_numbers() {\n") && replay.contains("qsort() {\n"), "\(replay.prefix(1500))")
    let nested = replay.components(separatedBy: "\n").first { $0.hasSuffix("sort_compare();") } ?? ""
    #expect(
      nested.contains("|       sort_compare();"), "sort_compare is not called inside qsort: \(replay.prefix(1500))")

    // -l/--nest-libcall: a program with patch sites (traced through them), the libraries'
    // functions relocated, nested where the program calls them; after the recording ended at
    // exit, nothing is counted as dropped.
    try FileManager.default.createDirectory(
      at: directory.appendingPathComponent("nop"), withIntermediateDirectories: true)
    let nopSorts = try RecordCommandTests.program(
      "sorts", compiler: "clang", flags: ["-O2", "-fpatchable-function-entry=5"],
      in: directory.appendingPathComponent("nop"))
    let nestedTrace = directory.appendingPathComponent("trace-nested")
    let nestedRun = try RecordCommandTests.record(nestedTrace, [nopSorts], options: ["-l"])
    #expect(nestedRun.status == 0 && nestedRun.stdout == untraced.stdout, "\(nestedRun.stderr)")
    let nestedCounts = try RecordCommandTests.recordedCounts(nestedTrace)
    #expect(
      nestedCounts["qsort"] == 1 && nestedCounts["sort_compare"] == compared,
      "\(nestedCounts.filter { $0.key.contains("sort") })")
    let nestedReplay = try TestSupport.run(OptimizedProgramTests.tracery, ["replay", "-d", nestedTrace.path])
    #expect(nestedReplay.stdout.contains("    sort_numbers() {\n"), "\(nestedReplay.stdout.prefix(800))")
    #expect(!nestedReplay.stderr.contains("dropped"), "\(nestedReplay.stderr)")

    // A plugin built without patch sites, loaded with dlopen after the start (twice: closed in
    // between): its functions the glob matches are relocated as it loads.
    let plugin = directory.appendingPathComponent("plugin.so").path
    try TestSupport.compile(
      compiler: "gcc", sources: [RecordCommandTests.programs.appendingPathComponent("plugin.c").path],
      flags: ["-O2", "-shared", "-fPIC"], output: plugin)
    let host = try RecordCommandTests.program("dlhost", flags: ["-O2", "-ldl"], in: directory)
    let loads = directory.appendingPathComponent("trace-plugin")
    let loaded = try RecordCommandTests.record(loads, [host, plugin], options: ["--patch", "*plugin*"])
    #expect(loaded.status == 0 && loaded.stdout == "90\n", "\(loaded.stderr)")
    let pluginCounts = try RecordCommandTests.recordedCounts(loads)
    #expect(
      pluginCounts["call_plugin"] == 6 && pluginCounts["plugin_work"] == 6 && pluginCounts["plugin_helper"] == 12,
      "\(pluginCounts)")

    let programs = [
      ("tails", "gcc", ["-O2", "-pthread"]), ("children", "gcc", ["-O2"]), ("throws", "clang++", ["-O2"]),
    ]
    for (name, compiler, flags) in programs {
      let program: String
      if compiler == "clang++" {
        program = directory.appendingPathComponent(name).path
        try TestSupport.compile(
          compiler: compiler, sources: [RecordCommandTests.programs.appendingPathComponent("\(name).cpp").path],
          flags: flags, output: program)
      } else {
        program = try RecordCommandTests.program(name, compiler: compiler, flags: flags, in: directory)
      }
      let plain = try TestSupport.run(program, [])
      let everything = directory.appendingPathComponent("all-\(name)")
      let result = try RecordCommandTests.record(everything, [program], options: ["--patch", "*"])
      #expect(result.status == plain.status && result.stdout == plain.stdout, "\(name): \(result.stderr)")
      let info = try TestSupport.run(OptimizedProgramTests.tracery, ["info", "-d", everything.path]).stdout
      let line = info.components(separatedBy: "\n").first { $0.contains("traced    :") } ?? ""
      let traced = Int(line.split(separator: ":").last?.split(separator: " ").first ?? "") ?? 0
      #expect(traced > 2_000, "\(name): \(line)")
    }
  }

  /// Code Tracery does not know — a page of anonymous memory (a JIT's compiled code) and, in a
  /// program without patch sites, 64 KiB of its text that no call frame describes (V8's
  /// builtins in node) — calls a traced function, which checks that its return address is
  /// where its caller put it (V8 reads its frames' return addresses, and node died under
  /// `tracery record` before this). Those calls are left untraced; the program's own are
  /// recorded. The patchable build is not swept for builtins, so it runs the page only.
  @Test(arguments: [[], ["-fpatchable-function-entry=5"]])
  func callsFromAJitsCodeKeepTheirReturnAddresses(flags: [String]) throws {
    let directory = try TestSupport.temporaryDirectory("record-foreign")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program("foreigncallers", flags: ["-O2"] + flags, in: directory)
    let arguments = flags.isEmpty ? [] : ["page-only"]
    let untraced = try TestSupport.run(program, arguments)
    #expect(untraced.status == 0 && untraced.stdout.contains("wrong 0"), "\(untraced.stdout)")
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program] + arguments)
    #expect(traced.status == 0, "\(traced.stdout) \(traced.stderr)")
    #expect(traced.stdout == untraced.stdout)
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["checked"] == 3, "\(counts)")
    #expect(counts["main"] == 1, "\(counts)")
    // The calls left untraced are counted, and `info` says how many.
    let calls = try #require(untraced.stdout.split(separator: " ").dropFirst().first.flatMap { Int($0) })
    let info = try TestSupport.run(OptimizedProgramTests.tracery, ["info", "-d", trace.path]).stdout
    #expect(calls > 3 && info.contains("jit calls : \(calls - 3) calls from a JIT's code left untraced"), "\(info)")
  }

  /// `--jit-calls`: the anonymous page's calls are traced too (the program then sees a return
  /// address that is not its caller's, and says so), and the trace's info says it was asked.
  @Test func jitCallsAreTracedWhenAsked() throws {
    let directory = try TestSupport.temporaryDirectory("record-jit-calls")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "foreigncallers", flags: ["-O2", "-fpatchable-function-entry=5"], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program, "page-only"], options: ["--jit-calls"])
    #expect(traced.status == 1 && traced.stdout.contains("calls 8 wrong 5"), "\(traced.stdout) \(traced.stderr)")
    #expect(try RecordCommandTests.recordedCounts(trace)["checked"] == 8)
    let summary = try TestSupport.run(OptimizedProgramTests.tracery, ["info", "-d", trace.path]).stdout
    #expect(!summary.contains("jit calls"), "\(summary)")
    let info = try String(contentsOf: trace.appendingPathComponent("info"), encoding: .utf8)
    #expect(info.contains("jit-calls yes"), "\(info)")
  }
}
