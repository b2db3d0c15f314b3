import ArgumentParser
import Foundation
import TraceryCore
import TraceryELF
import TraceryRecord

struct Live: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Record a program into a temporary directory, then replay it.")

  @OptionGroup var filters: FilterOptions
  @OptionGroup var record: RecordOptions
  @Option(help: Demangler.Style.help) var demangle: Demangler.Style = .simple

  func validate() throws { try record.checkCommand(of: Self.self) }

  func run() throws {
    try reportingUserErrors {
      let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tracery-live-\(getpid())").path
      defer { try? FileManager.default.removeItem(atPath: directory) }
      let recorder = Recorder(options: record, filters: filters)
      var status = ProgramStatus.exited(0)
      if let pid = record.pid {
        var attacher = Attacher(recorder: recorder, pid: pid, duration: record.durationNanoseconds)
        try attacher.run(directory: directory)
      } else {
        status = try recorder.run(directory: directory)
      }
      try TraceReading.read(directory, filters: filters, demangle: demangle) {
        trace, threads, filter, symbolizer, output in
        Readers.replay(trace, threads: threads, filter: filter, names: symbolizer.names, output: output)
      }
      try status.passThrough()
    }
  }
}
