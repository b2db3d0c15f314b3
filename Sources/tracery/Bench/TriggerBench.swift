import CTraceryBench
import TraceryCore

/// `tracery bench trigger`: the kernel's BPF selftest bench_trigger in user space. A C loop calls one
/// patchable C function; each variant attaches empty handlers to it and is timed right after
/// an untraced run of the same loop, which is its baseline.
struct TriggerBench {
  static let iterations = 20_000_000
  let runs: Int
  let cacheDirectory: String

  /// Empty Swift handlers: no captures, no globals, nothing for the exclusivity checker.
  static let swiftEntry: EntryHandler = { _, _ in }
  static let swiftExit: ExitHandler = { _, _ in }
  static let swiftModifyReturn: ModifyReturnHandler = { _, _ in 0 }

  struct Variant {
    let name: String
    let handlers: [Handler]
  }

  /// Empty C handlers by kind.
  static let cHandlers: [String: Handler] = [
    "entry": .entry(
      unsafeBitCast(
        tracery_bench_empty_entry as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
        to: EntryHandler.self)),
    "exit": .exit(
      unsafeBitCast(
        tracery_bench_empty_exit as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
        to: ExitHandler.self)),
    "modify-return": .modifyReturn(
      unsafeBitCast(
        tracery_bench_empty_modify_return as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Int32,
        to: ModifyReturnHandler.self)),
  ]

  static var variants: [Variant] {
    let c = cHandlers
    let swift: [String: Handler] = [
      "entry": .entry(swiftEntry), "exit": .exit(swiftExit), "modify-return": .modifyReturn(swiftModifyReturn),
    ]
    var result: [Variant] = []
    for (suffix, handlers) in [("c", c), ("swift", swift)] {
      for name in ["entry", "exit", "modify-return"] {
        result.append(Variant(name: "\(name)-\(suffix)", handlers: [handlers[name]!]))
      }
      result.append(Variant(name: "entry+exit-\(suffix)", handlers: [handlers["entry"]!, handlers["exit"]!]))
    }
    return result
  }

  /// The measured loop: ns per call of the target, median of `runs` runs of `iterations` calls.
  static func loop(runs: Int) -> () -> Double {
    let expected = iterations * (iterations + 1) / 2
    return {
      var sum = 0
      let time = medianNanoseconds(runs: runs) { sum = tracery_bench_loop(iterations) }
      precondition(sum == expected, "the traced function returned a wrong value")
      return time / Double(iterations)
    }
  }

  func run(_ report: BenchReport) throws {
    let target = UInt64(
      UInt(bitPattern: unsafeBitCast(tracery_bench_target as @convention(c) (Int) -> Int, to: UnsafeRawPointer.self)))
    let model = FunctionModel(integerArguments: 1)
    let loop = Self.loop(runs: runs)
    _ = loop()  // warm up
    let untraced = loop()
    report.figure(name: "untraced", n: Self.iterations, nsPerItem: untraced, baseline: untraced)
    for variant in Self.variants where report.wants(variant.name) {
      let baseline = loop()
      var links: [Link] = []
      do {
        for handler in variant.handlers {
          links.append(try Tracer.shared.attach(handler, to: .address(target), model: model))
        }
      } catch {
        throw UserError("cannot attach for \(variant.name): \(error)")
      }
      let traced = loop()
      for link in links { link.detach() }
      report.figure(name: variant.name, n: Self.iterations, nsPerItem: traced, baseline: baseline)
    }
    try MultiBench(runs: runs, cacheDirectory: cacheDirectory).run(report, target: target, loop: loop)
    Tracer.shared.reclaim()
  }
}
