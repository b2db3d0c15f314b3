import Foundation
import TraceryCore
import TraceryRecord

/// `tracery bench attach`: `record -p` on a running host program that loaded a generated object
/// of 1,000 or 50,000 patchable functions and keeps calling them (every 97th, then a 200 µs
/// sleep). Per run: from the command's start to the agent's `attached` (injection, the agent's
/// load, its symbol tables, the patch batch), to the first recorded event, and the detach (from
/// `stop` to `detached`: the batch that takes every site out). The first attach of a process also
/// loads the agent; later ones find it loaded (both are reported: `-first` and the median of the
/// rest). Each run's trace is checked to hold events of the generated functions.
struct AttachBench {
  let runs: Int
  let cacheDirectory: String

  static let hostSource = """
    #include <dlfcn.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <unistd.h>
    typedef long (*tr_fn)(long);
    int main(int argc, char **argv) {
      void *library = dlopen(argv[1], RTLD_NOW);
      if (library == NULL) return 1;
      tr_fn *table = (tr_fn *)dlsym(library, "tr_table");
      long count = atol(argv[2]), x = 1;
      printf("ready\\n");
      fflush(stdout);
      for (;;) {
        for (long i = 0; i < count; i += 97) x = table[i](x);
        if (x == 42) printf("%ld\\n", x);
        usleep(200);
      }
    }
    """

  func run(_ report: BenchReport) throws {
    let host = try GeneratedLibrary.program(
      Self.hostSource, named: "host", in: cacheDirectory + "/attach", flags: ["-O2", "-ldl"])
    for functions in [1_000, 50_000] {
      let library = try GeneratedLibrary.path(functions: functions, directory: cacheDirectory, report: report)
      let process = Process()
      process.executableURL = URL(fileURLWithPath: host)
      process.arguments = [library, String(functions)]
      let output = Pipe()
      process.standardOutput = output
      try process.run()
      defer {
        process.terminate()
        process.waitUntilExit()
      }
      guard output.fileHandleForReading.readData(ofLength: 6) == Data("ready\n".utf8) else {
        throw UserError("the attach bench's host did not start")
      }
      var attached: [Double] = []
      var firstEvent: [Double] = []
      var detached: [Double] = []
      var traced = 0
      for _ in 0..<(runs + 1) {
        let traces = FileManager.default.temporaryDirectory.appendingPathComponent("tracery-bench-attach-\(getpid())")
        defer { try? FileManager.default.removeItem(at: traces) }
        let recorder = Recorder(
          options: try RecordOptions.parse(["--buffer-limit", "16"]), filters: try FilterOptions.parse([]))
        var attacher = Attacher(recorder: recorder, pid: process.processIdentifier, duration: 20e6)
        attacher.quiet = true
        traced = try attacher.run(directory: traces.path)
        guard traced >= functions, let first = try Self.firstEntry(in: traces.path) else {
          throw UserError("attaching to the host traced \(traced) functions and recorded no call")
        }
        attached.append(attacher.timing.attachedNanoseconds)
        detached.append(attacher.timing.detachNanoseconds)
        let ticks = Double(first &- attacher.timing.startTicks)
        firstEvent.append(ticks / TimeStampCounter.ticksPerNanosecond)
      }
      for (suffix, index) in [("-first", 0..<1), ("", 1..<(runs + 1))] {
        let attach = median(Array(attached[index]))
        report.figure(
          name: "attach-\(functions)\(suffix)", n: traced, nsPerItem: attach / Double(traced),
          extra: [
            "attached_ms": attach / 1e6, "first_event_ms": median(Array(firstEvent[index])) / 1e6,
            "detach_ms": median(Array(detached[index])) / 1e6,
          ])
      }
    }
  }

  /// The earliest event's counter reading in a trace directory's event files.
  static func firstEntry(in directory: String) throws -> UInt64? {
    var first: UInt64?
    for name in try FileManager.default.contentsOfDirectory(atPath: directory) where name.hasSuffix(".events") {
      guard let file = ThreadFile.open(path: directory + "/" + name, name: name).file else { continue }
      // A thread's events are in time order: its first is its earliest.
      var cursor = EventCursor(file)
      if let event = cursor.next() { first = min(first ?? event.timestamp, event.timestamp) }
    }
    return first
  }
}
