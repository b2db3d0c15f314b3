import Foundation
import TraceryCore
import TraceryRecord

/// `tracery bench record`:
///
/// - `tracery`, `uftrace`, `uftrace-dynamic`: a recursive fib run untraced, under the agent
///   recording every function, and under `uftrace record` (two modes) when uftrace is installed;
///   ns per call of each, the untraced run as baseline. The program times its own fib call
///   (start-up and the agent's attach are left out) and counts its calls; the bench checks that
///   the trace holds exactly that many entries (each of fib's two calls is kept a real call: at
///   -O2 clang had turned one into a loop, and the bench divided by twice the calls that ran).
/// - `floor-timestamps`: the same fib taking two time stamps per call itself, inline, each stored
///   with a word into a small ring, untraced: the floor under any recorder that times each call
///   (two `rdtsc` cost ~17 ns per call in fib here), beside the same untraced baseline.
/// - `tracery-relocated`: the same fib built without patch sites, recorded with
///   `--relocate` (entries checked the same way), beside the same untraced baseline.
/// - `program-tracery`, `program-uftrace`: the generated program (`GeneratedProgram`: 2,200
///   distinct functions, a call tree and deep chains, ~4.2 M calls) timed whole, start-up
///   included, untraced and recorded; ns per recorded call over the untraced run.
///   `program-floor`: its variant taking two time stamps per call inline (as `floor-timestamps`);
///   `program-floor-branches`: that variant with four taken jumps per call besides, at their own
///   addresses in every function (`GeneratedProgram.Variant.floorBranches`): the floor under a
///   recorder whose per-function code branches as Tracery's stubs do, in a program this size.
/// - `libcall`, `libcall-uftrace`: 1,000,000 `strlen` calls through the PLT recorded (entries
///   checked against the program's count) and under `uftrace record --force`, beside the same
///   loop untraced.
/// - `children-patchable`, `children-plain`: a parent that starts 50 children one after another
///   (a patchable program, and /bin/true), untraced and recorded: ms per child over untraced
///   (the median of each round's difference, the round's runs back to back).
///   `children-agent-loaded`: the patchable children with the agent preloaded but not asked to
///   record (no trace directory): what loading it costs (ld.so mapping and relocating it, its
///   runtime's initializers), the part of a child's start no recording work can take back.
///   Recorded children take blank files kept for them, as under `tracery record` (`BlankFiles`);
///   `children-patchable-no-blanks`: each creating its files itself.
///
/// Every recorded run records library calls, as `tracery record` does by default (and uftrace).
struct RecordBench {
  let runs: Int
  let cacheDirectory: String

  /// The agent preloaded, recording into `traces` as `tracery record` would ask it to (with the
  /// counter's rate measured once, here).
  static func agentEnvironment(_ agent: String, _ traces: String, relocate: Bool = false, blankSlots: Int = 0)
    -> [String: String]
  {
    var environment = [
      "LD_PRELOAD": agent, TimeStampCounter.environmentKey: String(TimeStampCounter.ticksPerNanosecond),
      XState.environmentKey: XState.environmentValue,
    ]
    var settings = AgentEnvironment(directory: traces)
    settings.relocate = relocate
    settings.blankSlots = blankSlots
    // As `tracery record` runs a program by default: its library calls recorded too.
    settings.libraryCalls = true
    settings.apply(to: &environment)
    return environment
  }

  static let source = """
    #include <stdio.h>
    #include <stdlib.h>
    #include <time.h>
    static long calls;
    \(GeneratedProgram.floorStamp)
    __attribute__((noinline)) long fib(long n) {
      stamp(n);
      calls++;
      if (n < 2) {
        stamp(n);
        return n;
      }
      long a = fib(n - 1);
      __asm__ volatile("" : "+r"(a));
      long b = fib(n - 2);
      __asm__ volatile("" : "+r"(b));
      stamp(n);
      return a + b;
    }
    int main(int argc, char **argv) {
      long n = argc > 1 ? atol(argv[1]) : 30;
      struct timespec a, b;
      clock_gettime(CLOCK_MONOTONIC, &a);
      long result = fib(n);
      clock_gettime(CLOCK_MONOTONIC, &b);
      printf("calls %ld ns %ld result %ld\\n", calls,
             (long)((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec)), result);
      return 0;
    }
    """

  func run(_ report: BenchReport) throws {
    let directory = cacheDirectory + "/record"
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    let sourcePath = directory + "/fib.c"
    let program = directory + "/fib"
    try Self.source.write(toFile: sourcePath, atomically: true, encoding: .utf8)
    try GeneratedLibrary.clang(
      ["-O2", "-fpatchable-function-entry=5", sourcePath, "-o", program], building: sourcePath)
    // `tracery-relocated`: the same fib built without patch sites, recorded with --relocate: its
    // prologue moved out of line, and its graph image preserving every register
    // (`GraphEmitter.preservesAll`).
    let plainProgram = directory + "/fib-plain"
    try GeneratedLibrary.clang(["-O2", sourcePath, "-o", plainProgram], building: sourcePath)
    // `floor-timestamps`: fib itself takes the two time stamps a recorded call needs and stores
    // them with a word each into a small ring (no trampoline, no fresh pages): what no recorder
    // that times each call can go below on this machine.
    let floorProgram = directory + "/fib-floor"
    try GeneratedLibrary.clang(["-O2", "-DTRACERY_FLOOR", sourcePath, "-o", floorProgram], building: sourcePath)
    let agent = try Recorder.agentPath()
    let traces = FileManager.default.temporaryDirectory.appendingPathComponent("tracery-bench-\(getpid())").path
    defer { try? FileManager.default.removeItem(atPath: traces) }

    var untraced: [Double] = []
    var traced: [Double] = []
    var relocated: [Double] = []
    var floor: [Double] = []
    var calls = 0
    for _ in 0..<runs {
      untraced.append(try measure(program, environment: [:]).perCall)
      let stamped = try measure(floorProgram, environment: [:])
      floor.append(stamped.perCall)
      for (target, relocate) in [(program, false), (plainProgram, true)] {
        try? FileManager.default.removeItem(atPath: traces)
        try FileManager.default.createDirectory(atPath: traces, withIntermediateDirectories: true)
        let recorded = try measure(target, environment: Self.agentEnvironment(agent, traces, relocate: relocate))
        if relocate { relocated.append(recorded.perCall) } else { traced.append(recorded.perCall) }
        calls = recorded.calls
        guard stamped.calls == calls else { throw UserError("fib-floor counted \(stamped.calls) calls, fib \(calls)") }
        let entries = try GeneratedProgram.recordedEntries(in: traces)
        guard entries == calls else {
          throw UserError(
            "the trace holds \(entries) entries but fib counted \(calls) calls: the figure would be wrong")
        }
      }
    }
    let baseline = median(untraced)
    for (name, figures) in [("floor-timestamps", floor), ("tracery", traced), ("tracery-relocated", relocated)] {
      report.figure(
        name: name, n: calls, nsPerItem: median(figures), baseline: baseline,
        extra: ["overhead_ns_per_call": median(figures) - baseline])
    }

    if report.wants("libcall") { try libraryCalls(report, agent: agent, traces: traces, directory: directory) }
    let uftrace = try? ProgramLocator.locate("uftrace")
    try generatedProgram(report, uftrace: uftrace, agent: agent, traces: traces)
    try children(report, agent: agent, traces: traces, directory: directory)
    guard let uftrace else {
      report.note("uftrace is not installed (apt-get install uftrace): no uftrace figure")
      return
    }
    let pgProgram = directory + "/fib-pg"
    try GeneratedLibrary.clang(["-O2", "-pg", sourcePath, "-o", pgProgram], building: sourcePath)
    // `uftrace`: its fastest mode, a -pg build (mcount). `uftrace-dynamic`: the same binary
    // tracery records, patched by uftrace at its patch sites (-P .).
    var uftraced: [Double] = []
    var dynamic: [Double] = []
    for _ in 0..<runs {
      try? FileManager.default.removeItem(atPath: traces)
      uftraced.append(
        try measure(uftrace, arguments: ["record", "-d", traces, pgProgram], environment: [:]).perCall)
      try? FileManager.default.removeItem(atPath: traces)
      dynamic.append(
        try measure(uftrace, arguments: ["record", "-d", traces, "-P", ".", program], environment: [:]).perCall)
    }
    for (name, figures) in [("uftrace", uftraced), ("uftrace-dynamic", dynamic)] {
      report.figure(
        name: name, n: calls, nsPerItem: median(figures), baseline: baseline,
        extra: ["overhead_ns_per_call": median(figures) - baseline])
    }
  }

  /// The generated program, whole runs: untraced, recorded by the agent, recorded by uftrace.
  private func generatedProgram(_ report: BenchReport, uftrace: String?, agent: String, traces: String) throws {
    let program = try GeneratedProgram.build(in: cacheDirectory + "/generated")
    let floorProgram = try GeneratedProgram.build(in: cacheDirectory + "/generated", variant: .floor)
    let branchesProgram = try GeneratedProgram.build(in: cacheDirectory + "/generated", variant: .floorBranches)
    let arguments = ["16", "32"]
    var untraced: [Double] = []
    var floor: [Double] = []
    var branches: [Double] = []
    var traced: [Double] = []
    var uftraced: [Double] = []
    var calls = 0
    /// One run of a floor variant, which must make the program's calls.
    func floorSeconds(_ path: String, _ variant: String) throws -> Double {
      let run = try MeasuredRun.run(path, arguments)
      guard run.status == 0, GeneratedProgram.calls(in: run.output) == calls else {
        throw UserError("the generated program's \(variant) variant failed or counted other calls: \(run.output)")
      }
      return run.seconds
    }
    for _ in 0..<runs {
      let plain = try MeasuredRun.run(program, arguments)
      guard plain.status == 0, let counted = GeneratedProgram.calls(in: plain.output) else {
        throw UserError("the generated program failed: \(plain.output)")
      }
      calls = counted
      untraced.append(plain.seconds)
      floor.append(try floorSeconds(floorProgram, "floor"))
      branches.append(try floorSeconds(branchesProgram, "floor-branches"))
      try? FileManager.default.removeItem(atPath: traces)
      try FileManager.default.createDirectory(atPath: traces, withIntermediateDirectories: true)
      let recorded = try MeasuredRun.run(
        program, arguments,
        environment: Self.agentEnvironment(agent, traces))
      traced.append(recorded.seconds)
      let entries = try GeneratedProgram.recordedEntries(in: traces)
      guard entries == calls else {
        throw UserError("the trace holds \(entries) entries but the program counted \(calls) calls")
      }
      if let uftrace {
        try? FileManager.default.removeItem(atPath: traces)
        let run = try MeasuredRun.run(uftrace, ["record", "-d", traces, "-P", ".", program] + arguments)
        guard run.status == 0 else { throw UserError("uftrace record failed") }
        uftraced.append(run.seconds)
      }
    }
    let baseline = median(untraced) * 1e9 / Double(calls)
    let figures = [
      ("program-floor", floor), ("program-floor-branches", branches), ("program-tracery", traced),
      ("program-uftrace", uftraced),
    ]
    for (name, samples) in figures where !samples.isEmpty {
      let perCall = median(samples) * 1e9 / Double(calls)
      report.figure(
        name: name, n: calls, nsPerItem: perCall, baseline: baseline,
        extra: ["overhead_ns_per_call": perCall - baseline])
    }
  }

  /// A parent that starts 50 children one after another, untraced, with the agent loaded only, and recorded.
  private func children(_ report: BenchReport, agent: String, traces: String, directory: String) throws {
    let spawner = directory + "/spawner"
    let spawnerSource = directory + "/spawner.c"
    let child = directory + "/child"
    let childSource = directory + "/child.c"
    try """
    #include <spawn.h>
    #include <stdlib.h>
    #include <sys/wait.h>
    extern char **environ;
    int main(int argc, char **argv) {
      int count = atoi(argv[1]);
      for (int i = 0; i < count; i++) {
        pid_t pid;
        char *child[] = {argv[2], 0};
        if (posix_spawn(&pid, argv[2], 0, 0, child, environ) != 0) return 1;
        int status;
        waitpid(pid, &status, 0);
      }
      return 0;
    }
    """.write(toFile: spawnerSource, atomically: true, encoding: .utf8)
    try "__attribute__((noinline)) int work(int x) { return x + 1; }\nint main(void) { return work(-1); }\n".write(
      toFile: childSource, atomically: true, encoding: .utf8)
    try GeneratedLibrary.clang(["-O2", spawnerSource, "-o", spawner], building: spawnerSource)
    try GeneratedLibrary.clang(
      ["-O2", "-fpatchable-function-entry=5", childSource, "-o", child], building: childSource)
    let count = 50
    /// ms per child of `measured` runs over the `untraced` ones of the same rounds. The overhead
    /// is the median of each round's difference: the machine's speed swings by up to 2× within
    /// minutes, and the difference of two medians moved by more than a change's worth between
    /// runs; the runs of one round follow each other.
    func figure(_ name: String, _ measured: [Double], over untraced: [Double], extra: [String: Double] = [:]) {
      let perChild = median(untraced) * 1e9 / Double(count)
      let measuredPerChild = median(measured) * 1e9 / Double(count)
      let overhead = median(zip(measured, untraced).map { $0 - $1 }) * 1e9 / Double(count)
      report.figure(
        name: name, n: count, nsPerItem: measuredPerChild, baseline: perChild,
        extra: extra.merging(["overhead_ms_per_child": overhead / 1e6]) { $1 })
    }
    for (name, target) in [("children-patchable", child), ("children-plain", "/bin/true")] {
      // The patchable children also with the agent loaded only, beside the same untraced runs.
      let loads = target == child && report.wants("children-agent-loaded")
      let creates = target == child && report.wants("children-patchable-no-blanks")
      var untraced: [Double] = []
      var loaded: [Double] = []
      var created: [Double] = []
      var traced: [Double] = []
      // Blanks the keeper made again (taken by the children), per recorded run with blanks: what
      // the figure says ran. (A child finding none left creates its file as without them.)
      var remade: [Double] = []
      /// One recorded run; `blanks`: with blank files kept for the children, as `tracery record` keeps them.
      func recorded(blanks: Bool) throws -> Double {
        try? FileManager.default.removeItem(atPath: traces)
        try FileManager.default.createDirectory(atPath: traces, withIntermediateDirectories: true)
        let keeper = blanks ? BlankFileKeeper(trace: traces) : nil
        let environment = Self.agentEnvironment(agent, traces, blankSlots: keeper?.slots ?? 0)
        let seconds = try MeasuredRun.run(spawner, [String(count), target], environment: environment).seconds
        if let keeper {
          keeper.stop()
          remade.append(Double(keeper.made))
        }
        return seconds
      }
      for _ in 0..<runs {
        untraced.append(try MeasuredRun.run(spawner, [String(count), target]).seconds)
        if loads {
          loaded.append(
            try MeasuredRun.run(spawner, [String(count), target], environment: ["LD_PRELOAD": agent]).seconds)
        }
        if creates { created.append(try recorded(blanks: false)) }
        traced.append(try recorded(blanks: true))
      }
      let processes = try FileManager.default.contentsOfDirectory(atPath: traces).filter { $0.hasPrefix("process-") }
      guard processes.count == count + 1 else {
        throw UserError("\(processes.count) processes recorded, \(count + 1) started")
      }
      if loads { figure("children-agent-loaded", loaded, over: untraced) }
      if creates { figure("children-patchable-no-blanks", created, over: untraced) }
      figure(name, traced, over: untraced, extra: ["blanks_made_again": median(remade)])
    }
  }

  /// `libcall`: a loop of 1,000,000 `strlen` calls through the PLT, timed by the program itself,
  /// untraced and recorded (every call recorded as `strlen@plt`; the trace's
  /// entries checked against the program's count).
  private func libraryCalls(_ report: BenchReport, agent: String, traces: String, directory: String) throws {
    let source = directory + "/libcall.c"
    let program = directory + "/libcall"
    try Self.libraryCallSource.write(toFile: source, atomically: true, encoding: .utf8)
    try GeneratedLibrary.clang(["-O2", "-fno-builtin", source, "-o", program], building: source)
    let environment = Self.agentEnvironment(agent, traces)
    var untraced: [Double] = []
    var traced: [Double] = []
    var calls = 0
    for _ in 0..<runs {
      untraced.append(try measure(program, environment: [:]).perCall)
      try? FileManager.default.removeItem(atPath: traces)
      try FileManager.default.createDirectory(atPath: traces, withIntermediateDirectories: true)
      let recorded = try measure(program, environment: environment)
      traced.append(recorded.perCall)
      calls = recorded.calls
      // Its strlen calls, two clock_gettime, a printf (all from main, untraced: depth 0) and
      // __cxa_finalize at exit.
      let entries = try GeneratedProgram.recordedEntries(in: traces, minimumDepth: 0, countingLibraryCalls: true)
      guard entries == calls + 4 else {
        throw UserError("the trace holds \(entries) entries but the program made \(calls + 4) library calls")
      }
    }
    let baseline = median(untraced)
    report.figure(
      name: "libcall", n: calls, nsPerItem: median(traced), baseline: baseline,
      extra: ["overhead_ns_per_call": median(traced) - baseline])
    // uftrace records library calls by default; `--force` lets it trace a binary built without
    // -pg (only its PLT calls then).
    guard let uftrace = try? ProgramLocator.locate("uftrace") else { return }
    var peer: [Double] = []
    for _ in 0..<runs {
      try? FileManager.default.removeItem(atPath: traces)
      peer.append(
        try measure(uftrace, arguments: ["record", "-d", traces, "--force", program], environment: [:]).perCall)
    }
    report.figure(
      name: "libcall-uftrace", n: calls, nsPerItem: median(peer), baseline: baseline,
      extra: ["overhead_ns_per_call": median(peer) - baseline])
  }

  static let libraryCallSource = """
    #include <stdio.h>
    #include <string.h>
    #include <time.h>
    int main(int argc, char **argv) {
      (void)argv;
      static char text[64] = "abcdefghijklmnopqrstuvwxyz";
      long calls = 1000000, sum = 0;
      struct timespec a, b;
      clock_gettime(CLOCK_MONOTONIC, &a);
      for (long i = 0; i < calls; i++) sum += strlen(text + (i & 7) + argc - 1);
      clock_gettime(CLOCK_MONOTONIC, &b);
      printf("calls %ld ns %ld sum %ld\\n", calls,
             (long)((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec)), sum);
      return 0;
    }
    """

  private func measure(_ executable: String, arguments: [String] = [], environment: [String: String]) throws -> (
    calls: Int, perCall: Double
  ) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
    let pipe = Pipe()
    process.standardOutput = pipe
    try process.run()
    let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    let fields = output.split(whereSeparator: { $0 == " " || $0 == "\n" })
    guard process.terminationStatus == 0, let index = fields.firstIndex(of: "calls"), fields.count > index + 3,
      let calls = Int(fields[index + 1]), let nanoseconds = Double(fields[index + 3]), calls > 0
    else { throw UserError("the benchmark program failed: \(output)") }
    return (calls, nanoseconds / Double(calls))
  }
}
