import Foundation
import TraceryCore

/// `tracery bench read`: the readers on a trace of at least 100 MB. The generated program
/// (`GeneratedProgram`, ~4.5 M calls) is recorded once by Tracery (the agent) and, when
/// installed, once by uftrace (`record -P .`, the same binary); then `replay`, `report` and `dump
/// --chrome` of each run to /dev/null, timed whole, with their peak memory (wait4's rusage). A
/// figure's `n` is the recorded calls, `ns_per_item` the reader's time per call; `seconds` and
/// `peak_mb` say it whole.
struct ReadBench {
  let runs: Int
  let cacheDirectory: String

  func run(_ report: BenchReport) throws {
    let program = try GeneratedProgram.build(in: cacheDirectory + "/generated")
    let arguments = ["16", "34"]
    let base = FileManager.default.temporaryDirectory.appendingPathComponent("tracery-bench-read-\(getpid())").path
    defer { try? FileManager.default.removeItem(atPath: base) }
    let trace = base + "/tracery.data"
    try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
    let tracery = try Self.selfPath()
    let recorded = try MeasuredRun.run(tracery, ["record", "-d", trace, "--", program] + arguments)
    guard recorded.status == 0, let calls = GeneratedProgram.calls(in: recorded.output) else {
      throw UserError("recording the generated program failed")
    }
    let entries = try GeneratedProgram.recordedEntries(in: trace)
    guard entries == calls else {
      throw UserError("the trace holds \(entries) entries, the program made \(calls) calls")
    }
    let size = try Self.size(of: trace)
    report.note(String(format: "tracery trace: %.0f MB, %d calls", Double(size) / 1e6, calls))
    var readers: [(name: String, executable: String, arguments: [String])] = [
      ("replay-tracery", tracery, ["replay", "-d", trace]),
      ("report-tracery", tracery, ["report", "-d", trace]),
      ("chrome-tracery", tracery, ["dump", "--chrome", "-d", trace]),
    ]
    if let uftrace = try? ProgramLocator.locate("uftrace") {
      let uftraceData = base + "/uftrace.data"
      let run = try MeasuredRun.run(uftrace, ["record", "-d", uftraceData, "-P", ".", program] + arguments)
      guard run.status == 0 else { throw UserError("uftrace record failed") }
      report.note(String(format: "uftrace trace: %.0f MB", Double(try Self.size(of: uftraceData)) / 1e6))
      readers += [
        ("replay-uftrace", uftrace, ["replay", "-d", uftraceData]),
        ("report-uftrace", uftrace, ["report", "-d", uftraceData]),
        ("chrome-uftrace", uftrace, ["dump", "--chrome", "-d", uftraceData]),
      ]
    } else {
      report.note("uftrace is not installed (apt-get install uftrace): no uftrace figures")
    }
    let peakProgram = try Self.buildPeak(in: cacheDirectory + "/generated")
    for reader in readers where report.wants(reader.name) {
      var seconds: [Double] = []
      var peak = 0
      for _ in 0..<runs {
        let run = try MeasuredRun.run(peakProgram, [reader.executable] + reader.arguments)
        guard run.status == 0, let kib = Int(run.errors.split(whereSeparator: \.isWhitespace).last ?? "") else {
          throw UserError("\(reader.name) failed: \(run.errors)")
        }
        seconds.append(run.seconds)
        peak = max(peak, kib)
      }
      report.figure(
        name: reader.name, n: calls, nsPerItem: median(seconds) * 1e9 / Double(calls),
        extra: ["seconds": median(seconds), "peak_mb": Double(peak) / 1024])
    }
  }

  /// A small C program that forks a command and prints its peak memory ("peak-kib N" on
  /// stderr): the memory of whatever forks or vforks a command counts as the command's own (Linux
  /// carries the old address space's high-water mark across exec), and this benchmark is large.
  static func buildPeak(in directory: String) throws -> String {
    let source = directory + "/peak.c"
    let program = directory + "/peak"
    try """
    #include <stdio.h>
    #include <sys/resource.h>
    #include <sys/wait.h>
    #include <unistd.h>
    int main(int argc, char **argv) {
      if (argc < 2) return 2;
      pid_t pid = fork();
      if (pid == 0) { execvp(argv[1], argv + 1); _exit(127); }
      int status = 0;
      struct rusage usage;
      if (wait4(pid, &status, 0, &usage) < 0) return 2;
      fprintf(stderr, "peak-kib %ld\\n", usage.ru_maxrss);
      return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    }
    """.write(toFile: source, atomically: true, encoding: .utf8)
    try GeneratedLibrary.clang(["-O2", source, "-o", program], building: source)
    return program
  }

  static func size(of directory: String) throws -> Int {
    try FileManager.default.contentsOfDirectory(atPath: directory).reduce(0) { total, name in
      let attributes = try? FileManager.default.attributesOfItem(atPath: directory + "/" + name)
      return total + (attributes?[.size] as? Int ?? 0)
    }
  }

  /// This executable's path (the readers measured are this build's).
  static func selfPath() throws -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard count > 0 else { throw UserError("cannot find this executable") }
    return String(decoding: buffer.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }
}
