import Foundation
import Testing
import TraceryTestSupport

/// What record writes, and how: private files, no symbolic links, and a program that records
/// into a file-size limit runs as it does untraced.
@Suite struct ReliabilityTests {
  static let tracery = ListCommandTests.tracery

  static func mode(_ path: String) -> Int {
    ((try? FileManager.default.attributesOfItem(atPath: path)[.posixPermissions]) as? Int) ?? -1
  }

  @Test func traceFilesArePrivateUnlessShared() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-modes")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.programs.appendingPathComponent("killed.c").path], in: directory)
    for (shared, directoryMode, fileMode) in [(false, 0o700, 0o600), (true, 0o755, 0o644)] {
      let trace = directory.appendingPathComponent(shared ? "shared" : "private")
      let result = try RecordCommandTests.record(trace, [program, "exit"], options: shared ? ["--shared"] : [])
      #expect(result.status == 7, "\(result.stderr)")
      #expect(Self.mode(trace.path) == directoryMode)
      #expect(Self.mode(trace.appendingPathComponent("symbols").path) == directoryMode)
      let files = try FileManager.default.subpathsOfDirectory(atPath: trace.path).filter { !$0.hasSuffix("symbols") }
      #expect(files.count >= 4)
      for file in files { #expect(Self.mode(trace.appendingPathComponent(file).path) == fileMode, "\(file)") }
    }
  }

  @Test func aSymbolicLinkOrAForeignDirectoryIsRefused() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-links")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.programs.appendingPathComponent("killed.c").path], in: directory)
    let target = directory.appendingPathComponent("elsewhere")
    try FileManager.default.createDirectory(at: target, withIntermediateDirectories: true)
    let link = directory.appendingPathComponent("link")
    try FileManager.default.createSymbolicLink(at: link, withDestinationURL: target)
    let refused = try RecordCommandTests.record(link, [program, "exit"])
    #expect(refused.status != 0 && refused.stderr.contains("is a symbolic link"), "\(refused.stderr)")
    #expect(try FileManager.default.contentsOfDirectory(atPath: target.path).isEmpty)

    // The agent alone, pointed at a directory others may write: it records nothing, says why,
    // and the program runs as it does untraced.
    let open = directory.appendingPathComponent("open")
    try FileManager.default.createDirectory(at: open, withIntermediateDirectories: true)
    chmod(open.path, 0o777)
    let agent = TestSupport.productsDirectory.appendingPathComponent("libtracery-agent.so").path
    let run = try TestSupport.run(
      program, ["exit"], environment: ["LD_PRELOAD": agent, "TRACERY_DIR": open.path])
    #expect(run.status == 7)
    #expect(run.stderr.contains("not recording"), "\(run.stderr)")
    #expect(try FileManager.default.contentsOfDirectory(atPath: open.path).isEmpty)
  }

  /// A file-size limit (RLIMIT_FSIZE, 2 MB) too small for the trace: no SIGXFSZ, the program's
  /// output and status unchanged, the events that found no room counted and reported.
  /// A program that closes every descriptor it did not open and then opens its own file (which
  /// gets the number the recorder's file had) writes its file as untraced, and the recording
  /// goes on, whole: the recorder checks its descriptor before each use and opens its file again
  /// (the chunks' zeros and events went into the program's file).
  @Test func aProgramThatClosesEveryDescriptorKeepsItsFileAndItsTrace() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-closeall")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "closeall", flags: ["-O2", "-fpatchable-function-entry=5"], in: directory)
    let output = directory.appendingPathComponent("written")
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(trace, [program, output.path], options: ["--no-libcall"])
    #expect(recorded.status == 0 && recorded.stdout == "2999999000000\n", "\(recorded.stderr)")
    let expected = (0..<1000).map { "line \($0)\n" }.joined()
    #expect(try String(contentsOf: output, encoding: .utf8) == expected)
    #expect(try RecordCommandTests.recordedCounts(trace)["work"] == 2_000_000)
    let info = try TestSupport.run(Self.tracery, ["info", "-d", trace.path]).stdout
    #expect(info.contains("0 dropped") && info.contains("damaged         : none"), "\(info)")
  }

  /// Signal handlers that run traced calls and `siglongjmp` out of wherever they interrupted
  /// the program (a traced call's entry or exit, the recorder's event, its refill): the program
  /// runs as untraced and its trace reads whole. (Before: a handler's events landed where the
  /// interrupted event then wrote its own, times went backwards, and abandoned refills crashed
  /// about one run in four.) Several runs per shape: where a signal lands is chance.
  @Test(arguments: [["-fpatchable-function-entry=5"], []])
  func signalHandlersThatLongjmpLeaveProgramAndTraceWhole(flags: [String]) throws {
    let directory = try TestSupport.temporaryDirectory("reliability-alarms")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program("alarms", flags: ["-O2"] + flags, in: directory)
    let runs = ProcessInfo.processInfo.environment["TRACERY_LONG_TESTS"] == "1" ? 60 : 6
    for run in 0..<runs {
      let trace = directory.appendingPathComponent("trace-\(run)")
      let recorded = try RecordCommandTests.record(trace, [program], options: ["--no-libcall"])
      #expect(recorded.status == 0 && recorded.stdout == "done 3000\n", "run \(run): \(recorded.stderr)")
      let info = try TestSupport.run(Self.tracery, ["info", "-d", trace.path]).stdout
      #expect(info.contains("damaged         : none"), "run \(run): \(info)")
      let counts = try RecordCommandTests.recordedCounts(trace)
      #expect(counts["main"] == 1 && (counts["deep"] ?? 0) >= 3000, "run \(run): \(counts)")
      try? FileManager.default.removeItem(at: trace)
    }
  }

  /// A recursion deeper than an event's depth field (14 bits) reads back whole; one deeper than
  /// the shadow stack (65,535 frames) records the calls it has room for and counts the others
  /// as dropped events (an entry and an exit each). Before: the reader took the wrapped depth
  /// for damage, and the calls past the shadow stack were lost without a count.
  @Test(arguments: [20000, 70000])
  func recursionDeeperThanTheDepthFieldAndTheShadowStack(depth: Int) throws {
    let directory = try TestSupport.temporaryDirectory("reliability-deep-\(depth)")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program("deep", flags: ["-O2", "-fpatchable-function-entry=5"], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(trace, [program, String(depth)], options: ["--no-libcall"])
    #expect(recorded.status == 0 && recorded.stdout == "\(depth) 10\n", "\(recorded.stderr)")
    let info = try TestSupport.run(Self.tracery, ["info", "-d", trace.path]).stdout
    #expect(info.contains("damaged         : none"), "\(info)")
    let dropped = info.split(separator: "\n").compactMap { line -> Int? in
      guard let range = line.range(of: #"(\d+) dropped\)"#, options: .regularExpression) else { return nil }
      return Int(line[range].split(separator: " ")[0])
    }.reduce(0, +)
    let calls = depth + 1 + 11
    let counts = try RecordCommandTests.recordedCounts(trace)
    if depth < 65_000 {
      #expect(counts["down"] == calls && dropped == 0, "\(counts) \(info)")
    } else {
      #expect(dropped > 0 && (counts["down"] ?? 0) + dropped / 2 == calls, "\(counts) \(info)")
    }
  }

  /// A program that sandboxes itself with a seccomp filter that kills the process for any
  /// system call it does not list (the agent's mappings, writes and seals are not listed): it
  /// runs as untraced, its threads' events up to the end of the chunks they had are in the trace
  /// (whole), the rest are counted as dropped, and `info` says why. Both ways in: `prctl` on the
  /// calling thread, and `syscall(SYS_seccomp)` with TSYNC while a worker thread records (and
  /// then exits under the filter). Before: killed by SIGSYS at its next refill. And as OpenSSH's
  /// sandboxed child does it, after lowering the file-size limit to 0: the agent's line in the
  /// process file then raised SIGXFSZ and killed it (its writes now stay within the limit).
  @Test(arguments: ["syscall", "prctl", "sshd"])
  func aProgramThatSandboxesItselfRunsAsUntraced(way: String) throws {
    let directory = try TestSupport.temporaryDirectory("reliability-sandboxed-\(way)")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "sandboxed", flags: ["-O2", "-pthread", "-fpatchable-function-entry=5"], in: directory)
    for run in 0..<3 {
      let trace = directory.appendingPathComponent("trace-\(run)")
      let recorded = try RecordCommandTests.record(trace, [program, way], options: ["--no-libcall"])
      #expect(recorded.status == 0, "run \(run): \(recorded.stderr)")
      #expect(recorded.stdout == "before 1499500\nafter 134999850000\n", "run \(run): \(recorded.stdout)")
      let info = try TestSupport.run(Self.tracery, ["info", "-d", trace.path]).stdout
      #expect(info.contains("damaged         : none"), "run \(run): \(info)")
      // (Under a file-size limit of 0 the process file cannot say it.)
      #expect(info.contains("sandboxed: thread") == (way != "sshd"), "run \(run): \(info)")
      #expect(!info.contains(", 0 dropped)"), "run \(run): \(info)")
      let counts = try RecordCommandTests.recordedCounts(trace)
      #expect(counts["main"] == 1 && (counts["work"] ?? 0) >= 2 && (counts["leaf"] ?? 0) >= 1000, "\(counts)")
      try? FileManager.default.removeItem(at: trace)
    }
  }

  /// A daemon's habit: change root, perhaps drop privileges, then start threads (memcached
  /// does). After a chroot the threads' files are made through the trace directory's kept
  /// descriptor; after a drop to nobody they cannot be made (the directory is root's, 0700), so
  /// the agent made spare files just before the drop (16): of 20 threads, 16 are recorded in
  /// spares and the process file, kept open, names the other 4; of 4, all are recorded and the
  /// spares left are removed after the run. Either way its last lines land: `info`
  /// says the exit ran. Before: the threads were missing without a word, and the process looked
  /// killed. (As root only: chroot needs it.)
  @Test(arguments: [("chroot", 4), ("drop", 4), ("drop", 20)])
  func aDaemonThatChangesRootAndUserKeepsItsThreads(mode: String, threads: Int) throws {
    guard getuid() == 0 else { return }
    let directory = try TestSupport.temporaryDirectory("reliability-chrooted-\(mode)")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "chrooted", flags: ["-O2", "-pthread", "-fpatchable-function-entry=5"], in: directory)
    let jail = directory.appendingPathComponent("jail")
    try FileManager.default.createDirectory(at: jail, withIntermediateDirectories: true)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(
      trace, [program, mode, jail.path, String(threads)], options: ["--no-libcall"])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    #expect(recorded.stdout == "before 1499500\nafter 1499500 \(threads * 1_499_500)\n", "\(recorded.stdout)")
    let info = try TestSupport.run(Self.tracery, ["info", "-d", trace.path]).stdout
    #expect(info.contains("exit ran") && info.contains("damaged         : none"), "\(info)")
    let counts = try RecordCommandTests.recordedCounts(trace)
    let names = try FileManager.default.contentsOfDirectory(atPath: trace.path)
    if mode == "chroot" {
      #expect(counts["work"] == 2 + threads && !info.contains("unrecorded"), "\(counts) \(info)")
    } else {
      #expect(counts["work"] == 2 + min(threads, 16), "\(counts) \(info)")
      let line = info.split(separator: "\n").first { $0.hasPrefix("#   unrecorded: threads ") } ?? ""
      #expect(line.split(separator: " ").filter { Int($0) != nil }.count == max(0, threads - 16), "\(info)")
      // The spares no thread took are removed after the run.
      #expect(names.filter { $0.contains("-spare") }.count == min(threads, 16), "\(names)")
    }
  }

  /// Functions that look at their callers, recorded with library calls (the default): with the
  /// return address a recorded library call gives them, dlsym(RTLD_NEXT) found nothing, ASan's
  /// reports named a stub in `memfd:tracery-code` as the faulting code, and backtrace() stopped
  /// at the first traced call (and showed the agent's own frames). gcc's ASan runtime also
  /// refused to run unless it was preloaded before the agent. Now each prints what it prints
  /// untraced.
  @Test func functionsThatLookAtTheirCallersSeeWhatTheySeeUntraced() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-callers")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "callers", flags: ["-O2", "-fpatchable-function-entry=5"], in: directory)
    let untraced = try TestSupport.run(program, [])
    #expect(untraced.status == 0 && untraced.stdout.hasPrefix("next found, frames "), "\(untraced.stdout)")
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(trace, [program])
    #expect(recorded.status == 0 && recorded.stdout == untraced.stdout, "\(recorded.stdout) \(recorded.stderr)")
    #expect(try RecordCommandTests.recordedCounts(trace)["depth3"] == 1)

    let sanitized = directory.appendingPathComponent("callers-asan").path
    try TestSupport.compile(
      compiler: "gcc", sources: [RecordCommandTests.programs.appendingPathComponent("callers.c").path],
      flags: ["-O2", "-g", "-fsanitize=address", "-fpatchable-function-entry=5"], output: sanitized)
    let reported = try TestSupport.run(sanitized, ["overflow"])
    let asanTrace = directory.appendingPathComponent("asan-trace")
    let asan = try RecordCommandTests.record(asanTrace, [sanitized, "overflow"])
    #expect(asan.status == reported.status && asan.stdout == reported.stdout, "\(asan.stdout) \(asan.stderr)")
    // The report's stacks, the allocation's too (ASan's frame-pointer walk inside calloc: the
    // library calls of a program built with a sanitizer are not recorded).
    for expected in ["heap-buffer-overflow", " in element ", " in main ", "allocated by"] {
      #expect(asan.stderr.contains(expected), "\(expected): \(asan.stderr)")
    }
    let allocation = asan.stderr.components(separatedBy: "allocated by").last ?? ""
    #expect(allocation.contains(" in main "), "\(asan.stderr)")
    #expect(!asan.stderr.contains("tracery-code"), "\(asan.stderr)")
  }

  /// backtrace() from a destructor while an exception unwinds through it: the walk sees every
  /// frame (the recorded library call to `backtrace` too), and the slots the unwinder restored
  /// stay restored, so the catch is reached. (Putting the graph's return addresses back into
  /// those would have stopped the unwind.)
  @Test func aBacktraceInADestructorDuringAnUnwind() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-dtorlog")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "dtorlog", compiler: "g++", flags: ["-O2", "-fpatchable-function-entry=5"], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(trace, [program])
    #expect(recorded.status == 0 && recorded.stdout == "sum 6 caught 3\n", "\(recorded.stdout) \(recorded.stderr)")
    #expect(try RecordCommandTests.recordedCounts(trace)["middle(int)"] == 6)
  }

  /// A thread forks while others run traced calls: each child records its own calls in its own
  /// file (it has only the forking thread), the parent's threads lose none.
  @Test func childrenForkedFromAThreadWhileOthersRecord() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-forkthreads")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "forkthreads", flags: ["-O2", "-pthread", "-fpatchable-function-entry=5"], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(trace, [program], options: ["--no-libcall"])
    #expect(recorded.status == 0 && recorded.stdout == "ok\n", "\(recorded.stderr)")
    #expect(try RecordCommandTests.recordedCounts(trace)["work"] == 2 * 300_000 + 20 * 1000)
    let info = try TestSupport.run(Self.tracery, ["info", "-d", trace.path]).stdout
    #expect(info.components(separatedBy: "# process ").count - 1 == 21, "\(info)")
    #expect(info.contains("damaged         : none"), "\(info)")
    let dropped = info.split(separator: "\n").filter { $0.contains(" dropped)") && !$0.contains(", 0 dropped)") }
    #expect(dropped.isEmpty, "\(dropped)")
  }

  @Test func aFileSizeLimitDropsEventsNotTheProgram() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-limit")
    let demo = try RecordCommandTests.build(
      [RecordCommandTests.examples.appendingPathComponent("demo/demo.c").path], in: directory)
    let untraced = try TestSupport.run(demo, ["22"])
    let trace = directory.appendingPathComponent("trace")
    // ulimit -f counts 512-byte blocks: 2 MB, room for one 1 MiB chunk per file.
    let limited = try TestSupport.run(
      "/bin/sh", ["-c", "ulimit -f 4096; exec '\(Self.tracery)' record -d '\(trace.path)' -- '\(demo)' 22"])
    #expect(limited.status == untraced.status)
    #expect(limited.stdout == untraced.stdout)
    let report = try TestSupport.run(Self.tracery, ["report", "-d", trace.path])
    #expect(report.status == 0)
    #expect(report.stderr.contains("events were dropped"), "\(report.stderr)")
    #expect(report.stdout.contains(" fib"), "the first chunk's events are there")
  }

  /// A recorded trace damaged four ways, each on a copy: a flipped bit (events that still look
  /// right), a file cut short, a deleted thread file, junk appended. Each is reported on stderr
  /// with its file, `tracery info` lists it, and every other thread replays exactly as before.
  @Test func damageIsReportedByFileAndTheRestIsIntact() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-damage")
    let demo = try RecordCommandTests.build(
      [RecordCommandTests.examples.appendingPathComponent("demo/demo.c").path], in: directory)
    let original = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(original, [demo, "22"])
    #expect(recorded.status == 0, "\(recorded.stderr)")
    let names = try FileManager.default.contentsOfDirectory(atPath: original.path).filter { $0.hasSuffix(".events") }
    func size(_ name: String) -> Int {
      ((try? FileManager.default.attributesOfItem(atPath: original.appendingPathComponent(name).path)[.size]) as? Int)
        ?? 0
    }
    let largest = try #require(names.max { size($0) < size($1) })
    let smallest = try #require(names.min { size($0) < size($1) })
    #expect(size(largest) > 4096 + (1 << 20), "a thread file of more than one chunk")
    func tid(_ name: String) -> String { String(name.dropLast(".events".count).split(separator: "-").last!) }
    func replay(_ trace: URL, _ name: String) throws -> TestSupport.ProcessResult {
      try TestSupport.run(Self.tracery, ["replay", "-d", trace.path, "--tid", tid(name)])
    }
    var before: [String: String] = [:]
    for name in names { before[name] = try replay(original, name).stdout }

    typealias Damage = (label: String, file: String, expected: String, change: (URL) throws -> Void)
    let damages: [Damage] = [
      (
        "flip", largest, "checksum mismatch",
        { file in
          var bytes = try Data(contentsOf: file)
          bytes[4096 + 16 + 8] ^= 0x04  // the first entry's counter: still a plausible event
          try bytes.write(to: file)
        }
      ),
      (
        "cut", largest, "the file is cut",
        { file in
          let handle = try FileHandle(forWritingTo: file)
          try handle.truncate(atOffset: UInt64(size(largest) - 40))
          try handle.close()
        }
      ),
      ("delete", smallest, "missing", { try FileManager.default.removeItem(at: $0) }),
      (
        "junk", largest, "not written by the recorder",
        { file in
          let bytes = try Data(contentsOf: file)
          let handle = try FileHandle(forWritingTo: file)
          try handle.seekToEnd()
          try handle.write(contentsOf: bytes[(4096 + 16)..<(4096 + 16 + 48)])  // its own first events again
          try handle.close()
        }
      ),
    ]
    for damage in damages {
      let copy = directory.appendingPathComponent(damage.label)
      try FileManager.default.copyItem(at: original, to: copy)
      try damage.change(copy.appendingPathComponent(damage.file))
      let path = copy.appendingPathComponent(damage.file).path
      let damaged = try TestSupport.run(Self.tracery, ["replay", "-d", copy.path])
      #expect(damaged.status == 0, "\(damage.label): \(damaged.stderr)")
      #expect(damaged.stderr.contains("\(path): "), "\(damage.label): \(damaged.stderr)")
      #expect(damaged.stderr.contains(damage.expected), "\(damage.label): \(damaged.stderr)")
      let info = try TestSupport.run(Self.tracery, ["info", "-d", copy.path])
      #expect(info.stdout.contains("# damaged         : \(path): "), "\(damage.label): \(info.stdout)")
      for name in names where name != damage.file {
        #expect(try replay(copy, name).stdout == before[name], "\(damage.label): thread \(name) changed")
      }
      if damage.label == "flip" || damage.label == "junk" {
        #expect(try replay(copy, damage.file).stdout.count == before[damage.file]!.count, "\(damage.label)")
      }
    }
    let intact = try TestSupport.run(Self.tracery, ["info", "-d", original.path])
    #expect(intact.stdout.contains("# damaged         : none"), "\(intact.stdout)")
    #expect(intact.stdout.contains("exit ran"))
  }

  /// The program removes its own trace directory while it is recorded: it runs on as untraced
  /// (its output and status unchanged), and record says there is no trace.
  @Test func aTraceDirectoryRemovedWhileRecordingCostsTheTraceNotTheProgram() throws {
    let directory = try TestSupport.temporaryDirectory("reliability-removed")
    let program = try RecordCommandTests.build(
      [RecordCommandTests.programs.appendingPathComponent("removes.c").path], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let untraced = try TestSupport.run(program, [directory.appendingPathComponent("elsewhere").path])
    let recorded = try RecordCommandTests.record(trace, [program, trace.path])
    #expect(recorded.status == 3 && untraced.status == 3)
    #expect(recorded.stdout == untraced.stdout && recorded.stdout == "6765 6765 0\n", "\(recorded.stdout)")
    #expect(recorded.stderr.contains("no trace"), "\(recorded.stderr)")
    #expect(!FileManager.default.fileExists(atPath: trace.path))
  }

  /// A process that leaves by `_exit` or `_Exit` (dash does) runs no atexit handler: its chunks
  /// are sealed and its last lines written all the same, so `info` says its exit ran, as after
  /// `exit`. A vfork child that `_exit`s at once, in its parent's memory, leaves the parent's
  /// recording as it was: the calls after it are all recorded. Before: "without its exit
  /// (killed, crashed or still running)". From a signal handler `_exit` (and `exit`) leave at
  /// once, unsealed (the sealing allocates, and a handler may have interrupted malloc): the
  /// events are read all the same.
  @Test(arguments: ["exit", "_exit", "_Exit", "handler", "exit-handler"])
  func aProcessThatLeavesWithoutExitIsSealed(way: String) throws {
    let directory = try TestSupport.temporaryDirectory("reliability-quickexit\(way)")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program(
      "quickexit", flags: ["-O2", "-fpatchable-function-entry=5"], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let recorded = try RecordCommandTests.record(trace, [program, way])
    #expect(recorded.status == 3 && recorded.stdout == "7498507\n", "\(recorded.stdout) \(recorded.stderr)")
    let info = try TestSupport.run(Self.tracery, ["info", "-d", trace.path]).stdout
    #expect(
      info.contains("exit ran") == !way.hasSuffix("handler") && info.contains("damaged         : none"), "\(info)")
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["work"] == 2 && counts["leaf"] == 3000, "\(counts)")
  }
}
