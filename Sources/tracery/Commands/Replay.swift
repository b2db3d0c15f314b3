import ArgumentParser
import Foundation
import TraceryELF
import TraceryRecord

struct Replay: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Print the recorded calls as a call tree with durations, threads interleaved by time.")

  @OptionGroup var location: TraceLocation
  @Option(name: .long, help: "Only this thread.")
  var tid: Int32?
  @OptionGroup var filters: FilterOptions

  func run() throws {
    try reportingUserErrors {
      try TraceReading.read(location.directory, tid: tid, filters: filters, demangle: location.demangle) {
        trace, threads, filter, symbolizer, output in
        Readers.replay(trace, threads: threads, filter: filter, names: symbolizer.names, output: output)
      }
    }
  }
}
