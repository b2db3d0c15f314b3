import ArgumentParser
import Foundation
import TraceryCore
import TraceryELF
import TraceryRecord

struct Record: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Run a program with the agent preloaded and record every call of its patchable functions.",
    discussion: """
      Functions with patch sites (clang or gcc -fpatchable-function-entry=5, or gcc -pg -mfentry \
      -mnop-mcount -mrecord-mcount) are traced through them; a program without any has its own \
      functions traced by relocating their first instructions (as --relocate asks for). The \
      program's exit status and signals pass through.
      """
  )

  @Option(
    name: .shortAndLong, help: "The trace directory (an old one is kept as DIR.old).")
  var directory: String = "tracery.data"
  @OptionGroup var filters: FilterOptions
  @OptionGroup var record: RecordOptions

  func validate() throws { try record.checkCommand(of: Self.self) }

  func run() throws {
    try reportingUserErrors {
      let recorder = Recorder(options: record, filters: filters)
      if let pid = record.pid {
        var attacher = Attacher(recorder: recorder, pid: pid, duration: record.durationNanoseconds)
        try attacher.run(directory: directory)
        return
      }
      let status = try recorder.run(directory: directory)
      try status.passThrough()
    }
  }
}
