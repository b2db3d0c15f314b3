import CTraceryBench
import TraceryCore

/// `tracery bench graph`: the trigger loop (`TriggerBench`) with the ftrace layer on its target:
/// function-graph users, fprobes, and ops through their own trampoline or the shared caller.
/// Each variant is timed right after an untraced run of the same loop, its baseline.
struct GraphBench {
  let runs: Int

  struct Variant {
    let name: String
    /// Attaches to `target`; returns what detaches.
    let attach: (UInt64) throws -> () -> Void
  }

  typealias CGraphEntry =
    @convention(c) (
      UnsafeMutablePointer<tracery_graph_frame>?, UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<tracery_call>?,
      UInt64
    ) -> Int32
  typealias CGraphExit =
    @convention(c) (
      UnsafeMutablePointer<tracery_graph_frame>?, UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<tracery_call>?,
      UInt64
    ) -> Void
  typealias CFprobeEntry =
    @convention(c) (UInt64, UnsafeMutablePointer<tracery_call>?, UnsafeMutablePointer<UInt64>?, UInt64) -> Int32
  typealias CFprobeExit =
    @convention(c) (UInt64, UnsafeMutablePointer<tracery_call>?, UnsafeMutablePointer<UInt64>?, UInt64) -> Void

  static let graphEntry = unsafeBitCast(tracery_bench_empty_graph_entry as CGraphEntry, to: GraphEntryHandler.self)
  static let graphExit = unsafeBitCast(tracery_bench_empty_graph_exit as CGraphExit, to: GraphExitHandler.self)
  static let fprobeEntry = unsafeBitCast(
    tracery_bench_empty_fprobe_entry as CFprobeEntry, to: FprobeEntryHandler.self)
  static let fprobeExit = unsafeBitCast(tracery_bench_empty_fprobe_exit as CFprobeExit, to: FprobeExitHandler.self)
  static let opsCallback = unsafeBitCast(
    tracery_bench_empty_entry as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
    to: OpsCallback.self)

  static var variants: [Variant] {
    func graph(_ users: Int, vectorRegisters: Bool = true, model: FunctionModel? = nil) -> Variant {
      Variant(name: "graph-\(users)" + (vectorRegisters ? "" : "-integer") + (model == nil ? "" : "-model")) { target in
        let links = try (0..<users).map { _ in
          try Tracer.shared.attachGraph(
            .handlers(entry: graphEntry, exit: graphExit), to: .address(target), vectorRegisters: vectorRegisters,
            model: model)
        }
        return { for link in links { link.detach() } }
      }
    }
    func fprobe(_ name: String, exit: FprobeExitHandler?) -> Variant {
      Variant(name: name) { target in
        let probe = try Tracer.shared.registerFprobe(entry: fprobeEntry, exit: exit, to: .address(target))
        return { probe.unregister() }
      }
    }
    func ops(_ name: String, count: Int, flags: OpsFlags) -> Variant {
      Variant(name: name) { target in
        let links = try (0..<count).map { _ in
          try Tracer.shared.attachOps(opsCallback, to: .address(target), flags: flags)
        }
        return { for link in links { link.detach() } }
      }
    }
    return [
      graph(1), graph(3), graph(1, vectorRegisters: false), graph(1, model: FunctionModel(integerArguments: 1)),
      fprobe("fprobe-entry", exit: nil),
      fprobe("fprobe-entry-exit", exit: fprobeExit),
      ops("ops-own", count: 1, flags: []), ops("ops-shared-1", count: 1, flags: .alwaysShared),
      ops("ops-shared-2", count: 2, flags: []), ops("ops-shared-10", count: 10, flags: []),
    ]
  }

  func run(_ report: BenchReport) throws {
    let target = UInt64(
      UInt(bitPattern: unsafeBitCast(tracery_bench_target as @convention(c) (Int) -> Int, to: UnsafeRawPointer.self)))
    let loop = TriggerBench.loop(runs: runs)
    _ = loop()  // warm up
    for variant in Self.variants where report.wants(variant.name) {
      let baseline = loop()
      let detach: () -> Void
      do { detach = try variant.attach(target) } catch {
        throw UserError("cannot attach for \(variant.name): \(error)")
      }
      let traced = loop()
      detach()
      report.figure(name: variant.name, n: TriggerBench.iterations, nsPerItem: traced, baseline: baseline)
    }
    Tracer.shared.reclaim()
  }
}
