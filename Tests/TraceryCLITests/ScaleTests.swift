import Foundation
import Testing
import TraceryTestSupport

@testable import TraceryRecord

/// Readers in bounded memory: a thousand processes, and a trace larger than the memory the
/// readers are allowed. Peak memory is the reader's own (wait4's rusage).
@Suite struct ScaleTests {
  static let tracery = ListCommandTests.tracery
  /// The readers' goal (issue 14): at most 64 MB whatever the trace.
  static let limitKiB = 64 * 1024

  @Test func aThousandShortLivedChildProcesses() throws {
    let directory = try TestSupport.temporaryDirectory("scale-children")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.programs.appendingPathComponent("children.c").path], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(trace, [program, "1000"])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    #expect(recorded.stdout == "1000 children\n")
    let files = try FileManager.default.contentsOfDirectory(atPath: trace.path)
    #expect(files.filter { $0.hasSuffix(".events") }.count == 1001)
    // The blank files kept for the children (`BlankFiles`) are gone with the recorder.
    #expect(!FileManager.default.fileExists(atPath: BlankFiles.directory(for: trace.path)))
    // Trimmed to what each process wrote: no 1 MiB chunks left reserved.
    let sizes = try files.filter { $0.hasSuffix(".events") }.map {
      try FileManager.default.attributesOfItem(atPath: trace.appendingPathComponent($0).path)[.size] as? Int ?? 0
    }
    #expect(sizes.allSatisfy { $0 < 64 << 10 }, "largest: \(sizes.max() ?? 0)")

    let output = directory.appendingPathComponent("report.txt").path
    let report = try TestSupport.runMeasured(Self.tracery, ["report", "-d", trace.path, "-s", "calls"], output: output)
    #expect(report.status == 0)
    #expect(report.peakKiB < Self.limitKiB, "report: \(report.peakKiB) KiB")
    let rows = try String(contentsOfFile: output, encoding: .utf8).split(separator: "\n")
    #expect(rows.contains { $0.hasSuffix(" work") && $0.contains("       1000  ") }, "\(rows.prefix(6))")
    #expect(rows.contains { $0.hasSuffix(" child") && $0.contains("       1000  ") })
    let replay = try TestSupport.runMeasured(Self.tracery, ["replay", "-d", trace.path], output: output)
    #expect(replay.status == 0 && replay.peakKiB < Self.limitKiB, "replay: \(replay.peakKiB) KiB")
    let lines = try String(contentsOfFile: output, encoding: .utf8).split(separator: "\n")
    #expect(lines.filter { $0.hasSuffix("|   child() {") }.count == 1000, "\(lines.prefix(8))")
  }

  /// What every traced process loads with the agent: no shared Swift runtime and no
  /// libstdc++.so (loading them cost each process 2.2 and 0.2 ms), and no Swift concurrency
  /// runtime or libdispatch linked in (one `ContinuousClock` brought both, and their
  /// constructors ran in every traced process, ~0.1 ms of a child's start), and not the
  /// runtime's CommandLine.cpp, whose constructor read /proc/self/maps (~0.2 ms; agent.c defines
  /// what it would), nor its Backtrace.cpp, whose constructor looked for the `swift-backtrace`
  /// program in the file system; and not libgcc_s (its constructor's `cpuid`; agent.c forwards the
  /// unwinder calls the C++ library makes), with its relative relocations packed (DT_RELR: 4 KB
  /// for the loader to read instead of 500 KB). Together ~0.2-0.3 ms of each child (session 25).
  @Test func theAgentCarriesOnlyWhatItsStartNeeds() throws {
    let agent = TestSupport.productsDirectory.appendingPathComponent("libtracery-agent.so").path
    let dynamic = try TestSupport.run("/usr/bin/readelf", ["-d", agent])
    #expect(dynamic.status == 0, "\(dynamic.stderr)")
    let needed = dynamic.stdout.split(separator: "\n").filter { $0.contains("(NEEDED)") }.compactMap { line in
      line.split(separator: "[").last?.split(separator: "]").first.map(String.init)
    }
    #expect(!needed.isEmpty)
    // Not libm either: the agent defines what the Swift standard library names of it (libm.c).
    #expect(Set(needed).isSubset(of: ["libc.so.6", "ld-linux-x86-64.so.2"]), "\(needed)")
    #expect(dynamic.stdout.contains("(RELR)") && !dynamic.stdout.contains("(RELACOUNT)"), "\(dynamic.stdout)")
    let symbols = try TestSupport.run("/usr/bin/nm", [agent])
    #expect(symbols.status == 0 && symbols.stdout.contains("tracery_agent_start"))
    for unwanted in [
      "_libdispatch_init", "swift_task_create", "swift_task_enqueueGlobal", "_GLOBAL__sub_I_CommandLine",
      "_GLOBAL__sub_I_Backtrace", "_swift_installCrashHandler", "swift_copyAuxiliaryExecutablePath",
    ] {
      #expect(!symbols.stdout.contains(unwanted), "the agent links \(unwanted)")
    }
  }

  /// Nor does the agent load libm at its start (it would if its code called a libm function it
  /// only forwards, libm.c): a recorded C program without libm finds none mapped.
  @Test func aRecordedProgramWithoutLibmGetsNone() throws {
    let directory = try TestSupport.temporaryDirectory("scale-libm")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.programs.appendingPathComponent("withoutlibm.c").path], in: directory)
    let untraced = try TestSupport.run(program, [])
    #expect(untraced.stdout == "libm absent 42\n", "\(untraced.stdout)")
    let recorded = try RecordCommandTests.record(directory.appendingPathComponent("trace"), [program])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    #expect(recorded.stdout == "libm absent 42\n", "\(recorded.stdout)")
    let counts = try RecordCommandTests.recordedCounts(directory.appendingPathComponent("trace"))
    #expect(counts["twice"] == 1, "\(counts)")
  }

  /// A trace laid out by hand, larger than the readers' memory limit (72 MB; 640 MB with
  /// TRACERY_LONG_TESTS): report and replay (and, in long runs, dump --chrome and info) go through
  /// it within 64 MB. (The suite runs debug builds, ~10x slower readers than release: hence the
  /// short default.)
  @Test func aTraceLargerThanTheReadersMemory() throws {
    let directory = try TestSupport.temporaryDirectory("scale-large")
    let trace = directory.appendingPathComponent("trace")
    try FileManager.default.createDirectory(at: trace, withIntermediateDirectories: true)
    try "tracery-trace 1\ncommand synthetic\n".write(
      to: trace.appendingPathComponent("info"), atomically: true, encoding: .utf8)
    let process = TracedProcess(
      session: "7.0", pid: 7, parent: 1, executable: "/synthetic", arguments: ["/synthetic"],
      ticksPerNanosecond: 1, startTicks: 1_000, startRealtimeNanoseconds: 1, objects: [], tracedFunctions: 64)
    try process.text.write(to: trace.appendingPathComponent("process-7.0.info"), atomically: true, encoding: .utf8)
    let megabytes = TestSupport.longTests ? 640 : 72
    let chunk = 1 << 20
    var header = [UInt8](repeating: 0, count: TraceFormat.headerSize)
    header.replaceSubrange(0..<8, with: TraceFormat.magic)
    for (offset, value, count) in [
      (TraceFormat.Header.version, 2, 4), (TraceFormat.Header.pid, 7, 4),
      (TraceFormat.Header.tid, 7, 4), (TraceFormat.Header.chunkSize, UInt64(chunk), 8),
    ] {
      for index in 0..<count { header[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index)) }
    }
    let path = trace.appendingPathComponent("7.0-7.events").path
    FileManager.default.createFile(atPath: path, contents: Data(header))
    let file = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    try file.seekToEnd()
    // One chunk of calls f(i % 64) { g } (48 bytes each, 21,845, the chunk's tail left zero),
    // written again and again: its counter runs backwards by less than the readers' slack (2^32
    // ticks) at each chunk start, so every copy reads as more calls.
    var bytes: [UInt8] = []
    bytes.reserveCapacity(chunk)
    var time: UInt64 = 2_000
    var perChunk = 0
    while bytes.count + 48 <= chunk {
      let site = 0x40_0000 + UInt64(perChunk % 64) * 16
      for event in [
        Event(timestamp: time, site: site, depth: 0, kind: .entry),
        Event(timestamp: time + 10, site: 0x50_0000, depth: 1, kind: .entry),
        Event(timestamp: time + 20, site: 0x50_0000, depth: 1, kind: .exit),
        Event(timestamp: time + 30, site: site, depth: 0, kind: .exit),
      ] { bytes += event.bytes }
      time += 40
      perChunk += 1
    }
    bytes += [UInt8](repeating: 0, count: chunk - bytes.count)
    for _ in 0..<megabytes { try file.write(contentsOf: bytes) }
    try file.close()
    let calls = perChunk * megabytes

    let output = directory.appendingPathComponent("out.txt").path
    let commands =
      TestSupport.longTests ? [["report"], ["replay"], ["dump", "--chrome"], ["info"]] : [["report"], ["replay"]]
    for command in commands {
      let result = try TestSupport.runMeasured(Self.tracery, command + ["-d", trace.path], output: output)
      #expect(result.status == 0, "\(command)")
      #expect(result.peakKiB < Self.limitKiB, "\(command): \(result.peakKiB) KiB for \(megabytes) MB")
      if command == ["report"] {
        let text = try String(contentsOfFile: output, encoding: .utf8)
        #expect(text.contains("     \(calls)  "), "g is called once per call: \(text.prefix(400))")
      }
    }
    // A reader that takes more than a second shows its progress when stderr is a terminal (a
    // pseudo-terminal from script(1)); the runs above, into files, showed none.
    if let script = TestSupport.which("script") {
      let shown = try TestSupport.run(
        script, ["-qec", "'\(Self.tracery)' report -d '\(trace.path)' > /dev/null", "/dev/null"])
      #expect(shown.stdout.contains("tracery: reading "), "\(shown.stdout.suffix(300))")
    }
  }
}
