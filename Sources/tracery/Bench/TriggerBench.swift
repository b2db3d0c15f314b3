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

  /// The empty C handlers' counting twins (each adds 1 at its cookie), by kind.
  static let countingHandlers: [HandlerKind: Handler] = [
    .entry: .entry(
      unsafeBitCast(
        tracery_bench_counting_entry as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
        to: EntryHandler.self)),
    .exit: .exit(
      unsafeBitCast(
        tracery_bench_counting_exit as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
        to: ExitHandler.self)),
    .modifyReturn: .modifyReturn(
      unsafeBitCast(
        tracery_bench_counting_modify_return
          as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Int32,
        to: ModifyReturnHandler.self)),
  ]

  /// What a figure divides by is what ran: `handlers`' kinds attached again as counting twins,
  /// the same way (`attach`: a handler and its cookie, returning its detach), and `calls`
  /// (`run`: calls made) must have run each exactly once per call. An attach that traced nothing,
  /// or a lookup that missed (an empty handler shows neither), fails the bench.
  static func proveEachCallRuns(
    _ name: String, kinds: [HandlerKind], run: () -> Int,
    attach: (Handler, UInt64) throws -> () -> Void
  ) throws {
    let counters = UnsafeMutablePointer<UInt64>.allocate(capacity: kinds.count)
    counters.initialize(repeating: 0, count: kinds.count)
    defer { counters.deallocate() }
    var detaches: [() -> Void] = []
    for (index, kind) in kinds.enumerated() {
      let cookie = UInt64(UInt(bitPattern: counters + index))
      do { detaches.append(try attach(countingHandlers[kind]!, cookie)) } catch {
        throw UserError("\(name): cannot attach its counting twin: \(error)")
      }
    }
    let calls = run()
    for detach in detaches { detach() }
    for (index, kind) in kinds.enumerated() where counters[index] != UInt64(calls) {
      throw UserError("\(name): the \(kind) handler ran \(counters[index]) times for \(calls) calls")
    }
  }

  /// Calls of `tracery_bench_target` made by a short run of the bench's loop.
  static func proofLoop() -> Int {
    _ = tracery_bench_loop(100_000)
    return 100_000
  }

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
      try Self.proveEachCallRuns(variant.name, kinds: variant.handlers.map(\.kind), run: Self.proofLoop) {
        handler, cookie in
        let link = try Tracer.shared.attach(handler, to: .address(target), cookie: cookie, model: model)
        return { link.detach() }
      }
      report.figure(name: variant.name, n: Self.iterations, nsPerItem: traced, baseline: baseline)
    }
    try MultiBench(runs: runs, cacheDirectory: cacheDirectory).run(report, target: target, loop: loop)
    try withoutNops(report)
    Tracer.shared.reclaim()
  }

  /// `entry-c-relocated`: the empty C entry handler on the same body without a NOP, through its
  /// relocated prologue; `entry-c-trap`: on a 4-byte function, through an int3 (a signal a call:
  /// 20,000 calls); `entry-c-nop`: `entry-c`'s NOP target called by the same loop as these two,
  /// which is what to compare them with (`entry-c`'s own loop measures ~0.8 ns less traced: the
  /// loops' code layout, not the site); `entry-multi-relocated`: the relocated body through the
  /// multi-attach global strategy (`attachBulk`). Each checks how its function was traced, beside
  /// its own untraced loop.
  private func withoutNops(_ report: BenchReport) throws {
    typealias Target = @convention(c) (Int) -> Int
    let cases: [(name: String, function: Target, iterations: Int, offset: Int, attach: Attach)] = [
      ("entry-c-relocated", tracery_bench_plain_target, Self.iterations, 1, Self.attachEntry(shape: .relocated)),
      ("entry-c-trap", tracery_bench_short_target, 20_000, 0, Self.attachEntry(shape: .trap)),
      ("entry-c-nop", tracery_bench_target, Self.iterations, 1, Self.attachEntry(shape: .nop)),
      ("entry-multi-relocated", tracery_bench_plain_target, Self.iterations, 1, Self.attachBulk),
    ]
    Tracer.shared.relocatesPrologues = true
    defer { Tracer.shared.relocatesPrologues = false }
    for test in cases where report.wants(test.name) {
      let address = UInt64(UInt(bitPattern: unsafeBitCast(test.function, to: UnsafeRawPointer.self)))
      let expected = test.iterations * (test.iterations - 1) / 2 + test.offset * test.iterations
      let loop = {
        var sum = 0
        let time = medianNanoseconds(runs: runs) { sum = tracery_bench_loop_calling(test.function, test.iterations) }
        precondition(sum == expected, "the traced function returned a wrong value")
        return time / Double(test.iterations)
      }
      _ = loop()
      let baseline = loop()
      let detach: () -> Void
      do {
        detach = try test.attach(TriggerBench.cHandlers["entry"]!, 0, address, test.name)
      } catch let error as UserError {
        throw error
      } catch {
        throw UserError("cannot attach for \(test.name): \(error)")
      }
      let traced = loop()
      detach()
      try Self.proveEachCallRuns(
        test.name, kinds: [.entry],
        run: {
          _ = tracery_bench_loop_calling(test.function, 1_000)
          return 1_000
        }
      ) { handler, cookie in try test.attach(handler, cookie, address, test.name) }
      report.figure(name: test.name, n: test.iterations, nsPerItem: traced, baseline: baseline)
    }
  }

  /// Attaches a handler with a cookie to the function at an address, checking how it was
  /// traced (the case's name for the error); returns its detach.
  typealias Attach = (_ handler: Handler, _ cookie: UInt64, _ address: UInt64, _ name: String) throws -> () -> Void

  /// A per-function trampoline; the function must get a site of `shape`.
  static func attachEntry(shape: PatchSite.Shape) -> Attach {
    { handler, cookie, address, name in
      let link = try Tracer.shared.attach(handler, to: .address(address), cookie: cookie)
      let shapes = Tracer.shared.siteShapes
      guard shapes[shape] == 1 else {
        link.detach()
        throw UserError("\(name): the function got another site shape (\(shapes))")
      }
      return { link.detach() }
    }
  }

  /// `entry-multi-relocated`: the multi-attach global strategy; the function must join a bulk
  /// link (no per-function state): for a relocated function its prologue stub (the moved
  /// instructions) and the global trampoline that keeps every register, the record by hash.
  static func attachBulk(_ handler: Handler, cookie: UInt64, address: UInt64, name: String) throws -> () -> Void {
    let link = try Tracer.shared.attachMulti(
      handler, to: .address(address), cookie: { _ in cookie }, model: FunctionModel(integerArguments: 1),
      strategy: .global(.hash))
    guard Tracer.shared.siteShapes.isEmpty, link.sites.count == 1 else {
      link.detach()
      throw UserError("\(name): the function did not join a bulk link (\(Tracer.shared.siteShapes))")
    }
    return { link.detach() }
  }
}
