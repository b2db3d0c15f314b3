import CTraceryBench
import Foundation
import TraceryCore

/// The multi-attach part of `tracery bench trigger` (the kernel's tracing multi-link): the same loop and target with the
/// handler attached through the global trampolines, in hash and padding modes; then every
/// function of a generated 50,000-function object attached too (`entry-multi-all`), with the
/// attach and detach time and the record memory per function.
struct MultiBench {
  static let allFunctions = 50_000
  let runs: Int
  let cacheDirectory: String

  func run(_ report: BenchReport, target: UInt64, loop: () -> Double) throws {
    let handlers: [(String, Handler)] = [
      ("entry", TriggerBench.cHandlers["entry"]!), ("exit", TriggerBench.cHandlers["exit"]!),
      ("modify-return", TriggerBench.cHandlers["modify-return"]!),
    ]
    let model = FunctionModel(integerArguments: 1, stackArgumentWords: 0, returns: .integer)
    for lookup in [MultiLookup.hash, .padding] {
      for (kind, handler) in handlers {
        let name = "\(kind)-multi-\(lookup)"
        guard report.wants(name) else { continue }
        let baseline = loop()
        let link: MultiLink
        do {
          link = try Tracer.shared.attachMulti(handler, to: .address(target), model: model, strategy: .global(lookup))
        } catch {
          throw UserError("cannot attach for \(name): \(error)")
        }
        let traced = loop()
        link.detach()
        try TriggerBench.proveEachCallRuns(name, kinds: [handler.kind], run: TriggerBench.proofLoop) {
          handler, cookie in
          let link = try Tracer.shared.attachMulti(
            handler, to: .address(target), cookie: { _ in cookie }, model: model, strategy: .global(lookup))
          return { link.detach() }
        }
        report.figure(name: name, n: TriggerBench.iterations, nsPerItem: traced, baseline: baseline)
      }
    }
    try all(report, target: target, loop: loop, model: model)
    Tracer.shared.reclaim()
  }

  /// Every function of the generated object and the target, one entry handler, one call.
  private func all(_ report: BenchReport, target: UInt64, loop: () -> Double, model: FunctionModel) throws {
    let library = try GeneratedLibrary.path(
      functions: Self.allFunctions, directory: cacheDirectory, report: report, sites: .padded)
    let handle = try GeneratedLibrary.load(library)
    defer { dlclose(handle) }
    let tracer = Tracer.shared
    tracer.reloadSymbols()
    let functions = tracer.symbols.functions.filter { $0.name.hasPrefix("tr_f") }.compactMap(\.site)
    guard functions.count == Self.allFunctions else {
      throw UserError("found \(functions.count) generated functions, expected \(Self.allFunctions)")
    }
    let sites = functions + [target]
    let entry = TriggerBench.cHandlers["entry"]!
    for lookup in [MultiLookup.hash, .padding] {
      guard ["entry", "attach", "detach"].contains(where: { report.wants("\($0)-multi-all-\(lookup)") }) else {
        continue
      }
      var attachSamples: [Double] = []
      var detachSamples: [Double] = []
      var traced: [Double] = []
      var baselines: [Double] = []
      var bytes = 0
      for _ in 0..<max(1, min(runs, 3)) {
        baselines.append(loop())
        var link: MultiLink?
        attachSamples.append(
          try medianNanoseconds(runs: 1) {
            link = try tracer.attachMulti(
              entry, to: .addresses(sites), cookie: { $0 }, model: model, strategy: .global(lookup))
          })
        guard let link, link.sites.count == sites.count else {
          throw UserError("attached to \(link?.sites.count ?? 0) functions, expected \(sites.count)")
        }
        bytes = tracer.multiTableBytes
        traced.append(loop())
        detachSamples.append(medianNanoseconds(runs: 1) { link.detach() })
        tracer.reclaim()
      }
      // The same 50,001 functions, every cookie the one counter: the target's lookup among them
      // finds its record once per call.
      try TriggerBench.proveEachCallRuns("entry-multi-all-\(lookup)", kinds: [.entry], run: TriggerBench.proofLoop) {
        handler, cookie in
        let link = try tracer.attachMulti(
          handler, to: .addresses(sites), cookie: { _ in cookie }, model: model, strategy: .global(lookup))
        return { link.detach() }
      }
      report.figure(
        name: "entry-multi-all-\(lookup)", n: TriggerBench.iterations, nsPerItem: median(traced),
        baseline: median(baselines))
      report.figure(
        name: "attach-multi-all-\(lookup)", n: sites.count, nsPerItem: median(attachSamples) / Double(sites.count),
        extra: ["bytes_per_function": Double(bytes) / Double(sites.count), "total_ms": median(attachSamples) / 1e6])
      report.figure(
        name: "detach-multi-all-\(lookup)", n: sites.count, nsPerItem: median(detachSamples) / Double(sites.count),
        extra: ["total_ms": median(detachSamples) / 1e6])
    }
  }
}
