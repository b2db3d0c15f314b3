import ArgumentParser
import Foundation
import TraceryELF
import TraceryRecord

/// Opening a trace directory, choosing its threads, naming its sites, and writing a reader's
/// output. Every reader streams (`Readers`, `TraceStream`): memory does not grow with the trace.
enum TraceReading {
  /// Opens the trace and says on stderr, once per file, what could not be read.
  static func open(_ directory: String) throws -> Trace {
    let trace: Trace
    do { trace = try Trace(directory: directory) } catch { throw UserError("\(error)") }
    warn(Trace.summary(of: trace.damage))
    return trace
  }

  static func warn(_ lines: [String]) {
    for line in lines { FileHandle.standardError.write(Data("tracery: warning: \(line)\n".utf8)) }
  }

  /// The threads to read: all, or `tid`'s (which must be in the trace).
  static func threads(_ trace: Trace, tid: Int32?) throws -> [ThreadFile] {
    guard let tid else { return trace.threads }
    let chosen = trace.threads.filter { $0.tid == tid }
    guard !chosen.isEmpty else {
      throw UserError(
        "no thread \(tid) in the trace (threads: \(trace.threads.map { String($0.tid) }.joined(separator: ", ")))")
    }
    return chosen
  }

  /// Checks that each -F / -N pattern names a traced function (one that matches nothing is a
  /// mistake worth saying before reading anything).
  static func check(_ filter: CallFilter, against symbolizer: Symbolizer) throws {
    guard !filter.only.isEmpty || !filter.hide.isEmpty else { return }
    let names = symbolizer.tracedNames
    for (flag, matchers) in [("-F", filter.only), ("-N", filter.hide)] {
      for matcher in matchers where !names.contains(where: matcher.matchesFunction) {
        throw UserError("no recorded function matches \(flag) '\(matcher.pattern)'")
      }
    }
  }

  /// Runs a reader over the trace in `directory`: `body` gets the trace, the chosen threads, the
  /// filter, the namer and the output, and returns the damage it found, which is said on stderr
  /// after the output (with the events that were dropped while recording).
  static func read(
    _ directory: String, tid: Int32? = nil, filters: FilterOptions, demangle: Demangler.Style,
    _ body: (Trace, [ThreadFile], CallFilter, Symbolizer, ByteOutput) throws -> [Damage]
  ) throws {
    let trace = try open(directory)
    let filter = try filters.filter(for: trace)
    let threads = try threads(trace, tid: tid)
    let symbolizer = Symbolizer(trace, demangle: demangle)
    try check(filter, against: symbolizer)
    let output = ByteOutput(fd: 1)
    let progress = Progress()
    TraceStream.progress = progress.show
    let damage = try body(trace, threads, filter, symbolizer, output)
    output.flush()
    progress.clear()
    warn(Trace.summary(of: damage))
    warnAboutDrops(trace)
  }

  static func warnAboutDrops(_ trace: Trace) {
    let dropped = trace.droppedEvents
    if dropped > 0 {
      FileHandle.standardError.write(
        Data(
          "tracery: \(dropped) events were dropped (buffer limit, full disk, file-size limit, seccomp sandbox or a recursion deeper than 65,535 calls); the trace is incomplete\n"
            .utf8))
    }
  }
}

/// A progress line on stderr for a reader that has run more than a second, when stderr is a
/// terminal: "tracery: reading 42% (3.1 M events)", rewritten in place and cleared at the end.
final class Progress {
  private let start = ContinuousClock.now
  private let terminal = isatty(2) != 0
  private var shown = false

  func show(read: Int, estimated: Int) {
    guard terminal, ContinuousClock.now - start > .seconds(1) else { return }
    let percent = min(99, read * 100 / max(estimated, 1))
    let line = String(format: "\rtracery: reading %d%% (%.1f M events)", percent, Double(read) / 1e6)
    FileHandle.standardError.write(Data(line.utf8))
    shown = true
  }

  func clear() {
    if shown { FileHandle.standardError.write(Data("\r\u{1b}[K".utf8)) }
  }
}
