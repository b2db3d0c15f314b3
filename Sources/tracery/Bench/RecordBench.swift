import Foundation

/// `tracery bench record`: a call-heavy program (recursive fib) run untraced, under the agent
/// recording every function, and under `uftrace record` (two modes) when uftrace is installed; ns per call
/// of each, the untraced run as baseline. The program times its own fib call (startup and the
/// agent's attach are left out) and counts the calls it makes.
struct RecordBench {
  let runs: Int
  let cacheDirectory: String

  static let source = """
    #include <stdio.h>
    #include <stdlib.h>
    #include <time.h>
    static long calls;
    __attribute__((noinline)) long fib(long n) {
      calls++;
      return n < 2 ? n : fib(n - 1) + fib(n - 2);
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
    let agent = try Recorder.agentPath()
    let traces = FileManager.default.temporaryDirectory.appendingPathComponent("tracery-bench-\(getpid())").path
    defer { try? FileManager.default.removeItem(atPath: traces) }

    var untraced: [Double] = []
    var traced: [Double] = []
    var calls = 0
    for _ in 0..<runs {
      let plain = try measure(program, environment: [:])
      untraced.append(plain.perCall)
      try? FileManager.default.removeItem(atPath: traces)
      try FileManager.default.createDirectory(atPath: traces, withIntermediateDirectories: true)
      let recorded = try measure(program, environment: ["LD_PRELOAD": agent, "TRACERY_DIR": traces])
      traced.append(recorded.perCall)
      calls = recorded.calls
    }
    let baseline = median(untraced)
    report.figure(
      name: "tracery", n: calls, nsPerItem: median(traced), baseline: baseline,
      extra: ["overhead_ns_per_call": median(traced) - baseline])

    guard let uftrace = try? ProgramLocator.locate("uftrace") else {
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
