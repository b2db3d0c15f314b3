import ArgumentParser
import Foundation
import TraceryELF

struct Bench: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Measure Tracery (run from a release build: swift build -c release).",
    discussion: """
      Suites:
        trigger ns per call of a traced function for entry, exit, modify-return and entry+exit \
      trampolines with empty C and Swift handlers, then through the multi-attach global trampolines \
      (hash and padding), also with all 50,000 functions of a generated object attached (with the \
      attach and detach time and record bytes per function), each beside the untraced call measured just before.
        patch   time to patch and unpatch 1,000 / 10,000 / 50,000 live sites in one batch each, \
      to load the ELF and build the symbol table of 50,000 functions, and to match a glob over all names; \
      to attach one entry handler to all 50,000 by one glob and detach it, per function (attach) and \
      as one multi-attach bulk link (attach-multi), at their NOP sites and (-relocated) by moving the \
      prologues of 50,000 functions built without NOPs.
        graph   ns per call of the same function with 1 and 3 function-graph users (entry+exit; one \
      user also with the function's model, and with handlers that promise no vector registers), an \
      entry-only and an entry+exit fprobe, one ops through its own trampoline, and 1, 2 and 10 ops through \
      the shared caller, each beside the untraced call measured just before.
        record  ns per call of a recursive fib program untraced (the baseline), taking two time \
      stamps per call itself (the floor), recorded by the agent (every function; the trace's \
      entries checked against the program's count), and recorded by `uftrace record` when installed; a generated program of 2,200 functions (~4.2 M \
      calls) timed whole, start-up included, untraced, recorded and under uftrace, beside its floors \
      (two time stamps per call inline; and with four taken jumps per call, the branches of a \
      recorder's per-function code); and a parent \
      starting 50 children (patchable, and /bin/true), untraced and recorded: ms per child, and the \
      patchable ones with the agent loaded but not recording (its load alone).
        read    replay, report and dump --chrome of a ~100 MB trace of the generated program: \
      seconds (ns per recorded call) and peak memory, beside uftrace's readers on its own trace of \
      the same run when installed (at most 3 runs each).
        relocate how every function of libc, libstdc++, the Swift runtime, FoundationEssentials, \
      this program (Swift -O) and gzip (gcc -O2, built from Debian's sources once) would be traced \
      with --relocate: at a NOP, relocated, through an int3 (and why), or not; ns per function to \
      decide, and the share of functions of 5 bytes or more relocated and traceable.
        attach  record -p on a running program calling a generated object of 1,000 and 50,000 \
      patchable functions: ms from the command to the agent's attached, to the first recorded event, \
      and to detach, for the first attach (which loads the agent) and the later ones.
      Each figure is the median of --runs runs. --json prints one object per line with the keys \
      suite, name, n, ns_per_item (and baseline_ns_per_item where an untraced baseline applies).
      """
  )

  enum Suite: String, ExpressibleByArgument, CaseIterable {
    case patch, trigger, graph, record, read, relocate, attach
  }

  @Argument(help: "The suite to run: \(Suite.allCases.map(\.rawValue).joined(separator: ", ")).")
  var suite: Suite

  @Flag(help: "One JSON object per line instead of a table.")
  var json = false

  @Option(help: "Runs per figure (the median is reported).")
  var runs = 7

  @Option(help: "Directory for generated benchmark programs (default: ~/.cache/tracery/bench).")
  var cache: String?

  @Option(
    help: """
      Only the trigger and graph variants with these names (comma-separated globs, e.g. \
      'entry-c,graph-1*'); the others are not run.
      """)
  var only: String?

  func filters() throws -> [Glob] {
    guard let only else { return [] }
    return try only.split(separator: ",").map { try Glob(String($0)) }
  }

  func validate() throws {
    guard runs >= 1 else { throw ValidationError("--runs must be at least 1") }
    do { _ = try filters() } catch { throw ValidationError("--only: \(error)") }
  }

  func run() throws {
    try reportingUserErrors {
      let report = BenchReport(suite: suite.rawValue, json: json, only: try filters())
      #if DEBUG
        report.note("warning: this is a debug build; figures are only meaningful from `swift build -c release`")
      #endif
      switch suite {
      case .patch: try PatchBench(runs: runs, cacheDirectory: cacheDirectory).run(report)
      case .trigger: try TriggerBench(runs: runs, cacheDirectory: cacheDirectory).run(report)
      case .graph: try GraphBench(runs: runs).run(report)
      case .record: try RecordBench(runs: runs, cacheDirectory: cacheDirectory).run(report)
      case .attach: try AttachBench(runs: runs, cacheDirectory: cacheDirectory).run(report)
      case .read: try ReadBench(runs: min(runs, 3), cacheDirectory: cacheDirectory).run(report)
      case .relocate: try RelocateBench(runs: min(runs, 3), cacheDirectory: cacheDirectory).run(report)
      }
    }
  }

  var cacheDirectory: String {
    if let cache { return cache }
    let environment = ProcessInfo.processInfo.environment
    let base = environment["XDG_CACHE_HOME"] ?? ((environment["HOME"] ?? NSTemporaryDirectory()) + "/.cache")
    return base + "/tracery/bench"
  }
}

/// Prints benchmark figures as a table for people or as JSON lines for scripts.
final class BenchReport {
  let suite: String
  let json: Bool
  /// `--only`: when not empty, the variants to run.
  let only: [Glob]
  private var printedHeader = false

  init(suite: String, json: Bool, only: [Glob] = []) {
    self.suite = suite
    self.json = json
    self.only = only
  }

  /// Whether the variant `name` is to be run.
  func wants(_ name: String) -> Bool { only.isEmpty || only.contains { $0.matches(name) } }

  /// A line for people (stderr in JSON mode, so stdout stays parseable).
  func note(_ text: String) {
    if json {
      FileHandle.standardError.write(Data((text + "\n").utf8))
    } else {
      print(text)
    }
  }

  func figure(name: String, n: Int, nsPerItem: Double, baseline: Double? = nil, extra: [String: Double] = [:]) {
    if json {
      var fields = [
        "\"suite\":\"\(suite)\"", "\"name\":\"\(name)\"", "\"n\":\(n)", "\"ns_per_item\":\(Self.number(nsPerItem))",
      ]
      if let baseline {
        fields.append("\"baseline_ns_per_item\":\(Self.number(baseline))")
        fields.append("\"calls_per_second\":\(Self.number(1e9 / nsPerItem))")
      }
      for (key, value) in extra.sorted(by: { $0.key < $1.key }) { fields.append("\"\(key)\":\(Self.number(value))") }
      print("{" + fields.joined(separator: ",") + "}")
      return
    }
    if !printedHeader {
      print("suite \(suite)")
      print("  name                         n          ns/item     total")
      printedHeader = true
    }
    let total = nsPerItem * Double(n)
    let totalText = total >= 1e6 ? String(format: "%.3f ms", total / 1e6) : String(format: "%.1f µs", total / 1e3)
    var line = "  " + name.padding(toLength: 28, withPad: " ", startingAt: 0)
    line += " " + String(n).padding(toLength: 10, withPad: " ", startingAt: 0)
    line += " " + String(format: "%9.1f", nsPerItem) + "   " + totalText
    if let baseline {
      line += String(
        format: "   %.1f M calls/s (baseline %.1f ns, ratio %.2f)", 1e3 / nsPerItem, baseline, nsPerItem / baseline)
    }
    for (key, value) in extra.sorted(by: { $0.key < $1.key }) { line += "   \(key) " + String(format: "%.1f", value) }
    print(line)
  }

  static func number(_ value: Double) -> String { String(format: "%.3f", value) }
}

/// Median of `runs` timings of `body`, in nanoseconds.
func medianNanoseconds(runs: Int, _ body: () throws -> Void) rethrows -> Double {
  var samples: [Double] = []
  let clock = ContinuousClock()
  for _ in 0..<runs {
    let start = clock.now
    try body()
    let elapsed = clock.now - start
    samples.append(Double(elapsed.components.seconds) * 1e9 + Double(elapsed.components.attoseconds) / 1e9)
  }
  return median(samples)
}

/// The median of `samples` (the mean of the middle two for an even count).
func median(_ samples: [Double]) -> Double {
  let sorted = samples.sorted()
  return sorted.count % 2 == 1
    ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
}
