import ArgumentParser
import Foundation
import TraceryELF
import TraceryRecord

struct Report: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Per function: total time, self time, calls, minimum and maximum.")

  @OptionGroup var location: TraceLocation
  @Option(name: .shortAndLong, help: "Sort by total, self, calls, min, max or name.")
  var sort: String = "total"
  @Flag(name: .long, help: "One table per thread.")
  var threads = false
  @OptionGroup var filters: FilterOptions

  func validate() throws {
    guard Render.SortKey(rawValue: sort) != nil else {
      throw ValidationError("--sort must be one of \(Render.SortKey.allCases.map(\.rawValue).joined(separator: ", "))")
    }
  }

  func run() throws {
    try reportingUserErrors {
      let key = Render.SortKey(rawValue: sort)!
      try TraceReading.read(location.directory, filters: filters, demangle: location.demangle) {
        trace, chosen, filter, symbolizer, output in
        let (tables, damage) = Readers.statistics(
          trace, threads: chosen, filter: filter, names: symbolizer.names, perThread: threads)
        for (thread, rows) in tables {
          if let thread { output.append("# thread \(thread.tid) (process \(thread.session))\n") }
          output.append(Render.report(Render.sorted(rows, by: key)) + (thread == nil ? "" : "\n"))
        }
        return damage
      }
    }
  }
}
