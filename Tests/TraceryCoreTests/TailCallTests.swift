import Foundation
import Testing
import TraceryFixtures
import TraceryOptimizedFixtures

@testable import TraceryCore

/// The -O2 fixtures (TraceryOptimizedFixtures): functions that enter each other by `jmp`.
enum TailFixture {
  typealias Unary = @convention(c) (Int) -> Int
  static let top = entryAddress(tracery_tail_top as Unary)
  static let mid = entryAddress(tracery_tail_mid as Unary)
  static let leaf = entryAddress(tracery_tail_leaf as Unary)
  static let outer = entryAddress(tracery_tail_outer as Unary)
  static let via = entryAddress(tracery_tail_via as Unary)
  static let even = entryAddress(tracery_tail_even as Unary)
  static let odd = entryAddress(tracery_tail_odd as Unary)
  static let longjmp = entryAddress(tracery_tail_longjmp as Unary)
  static let jumperMid = entryAddress(tracery_tail_jumper_mid as Unary)
  static let jumperLeaf = entryAddress(tracery_tail_jumper_leaf as Unary)
  static let throwTop = entryAddress(tracery_tail_throw_top as Unary)
  static let throwMid = entryAddress(tracery_tail_throw_mid as Unary)
  static let thrower = entryAddress(tracery_tail_thrower as Unary)
  static let intoCatcher = entryAddress(tracery_tail_into_catcher as Unary)
  static let catcher = entryAddress(tracery_tail_catcher as Unary)

  static let chain = [top, mid, leaf]

  /// Whether the function at `from` tail-calls `to` (ends in `jmp to`).
  static func jumps(_ from: UInt64, _ to: UInt64) -> Bool {
    tracery_tail_jumps(UnsafeRawPointer(bitPattern: UInt(from)), UnsafeRawPointer(bitPattern: UInt(to)), 48) != 0
  }

  /// The recorded graph events as (kind, site, depth, return value or first argument).
  static func events() -> [(kind: Int32, site: UInt64, depth: UInt64, value: Int)] {
    GraphFixture.events.map { ($0.kind, $0.site, $0.depth, Int(bitPattern: UInt($0.return_value))) }
  }

  /// Expects `events` to be two runs of a chain through `functions` (each entered at the next
  /// depth, then all left in reverse), named by their sites.
  static func expectTwoChains(_ events: [(kind: Int32, site: UInt64, depth: UInt64, value: Int)], _ functions: [UInt64])
  {
    let sites = functions.map(PatchSite.afterEndbr64)
    let kinds = Array(repeating: Int32(1), count: sites.count) + Array(repeating: Int32(2), count: sites.count)
    let depths = (0..<UInt64(sites.count)).map { $0 }
    #expect(events.map(\.kind) == kinds + kinds)
    #expect(events.map(\.depth) == depths + depths.reversed() + depths + depths.reversed())
    #expect(events.map(\.site) == sites + sites.reversed() + sites + sites.reversed())
  }
}

/// The Swift async convention's C fixtures (tail_fixtures.h): run calls mid, which tail-calls
/// leaf; with patch sites, or without (`plain`).
struct AsyncFixture {
  let run: TailFixture.Unary
  /// run, mid, leaf.
  let functions: [UInt64]
  var mid: UnsafeRawPointer { UnsafeRawPointer(bitPattern: UInt(functions[1]))! }

  init(plain: Bool) {
    var mid: UnsafeRawPointer?
    var leaf: UnsafeRawPointer?
    let run = tracery_async_functions(plain ? 1 : 0, &mid, &leaf)
    self.run = plain ? tracery_async_plain_run : tracery_async_run
    functions = [run, mid, leaf].map { UInt64(UInt(bitPattern: $0)) }
  }
}

extension PatchingTests {
  /// Tail calls (issue 13): a traced function that jumps to another keeps its frame; the callee's
  /// return unwinds both, with the callee's results, for every kind of exit.
  @Suite(.serialized) struct TailCallTests {
    let tracer = Tracer()

    @Test func theFixturesAreTailCalls() {
      #expect(TailFixture.jumps(TailFixture.top, TailFixture.mid))
      #expect(TailFixture.jumps(TailFixture.mid, TailFixture.leaf))
      #expect(TailFixture.jumps(TailFixture.even, TailFixture.odd))
      #expect(TailFixture.jumps(TailFixture.odd, TailFixture.even))
      #expect(TailFixture.jumps(TailFixture.jumperMid, TailFixture.jumperLeaf))
      #expect(TailFixture.jumps(TailFixture.throwTop, TailFixture.throwMid))
      #expect(TailFixture.jumps(TailFixture.throwMid, TailFixture.thrower))
      #expect(TailFixture.jumps(TailFixture.intoCatcher, TailFixture.catcher))
      #expect(!TailFixture.jumps(TailFixture.outer, TailFixture.top))
    }

    @Test func theGraphKeepsEveryFrameOfATailChain() throws {
      let link = try GraphFixture.attachRecording(
        tracer, to: .addresses(TailFixture.chain + [TailFixture.outer]), cookie: 1)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_tail_outer(5) == 1034)
      #expect(GraphThreads.depth == 0)
      let events = TailFixture.events()
      #expect(events.map(\.kind) == [1, 1, 1, 1, 2, 2, 2, 2])
      #expect(events.map(\.depth) == [0, 1, 2, 3, 3, 2, 1, 0])
      #expect(
        events.map(\.site)
          == [TailFixture.outer, TailFixture.top, TailFixture.mid, TailFixture.leaf]
          + [TailFixture.leaf, TailFixture.mid, TailFixture.top, TailFixture.outer])
      // Every frame of the chain returns the callee's result.
      #expect(events.filter { $0.kind == 2 }.map(\.value) == [34, 34, 34, 1034])

      // The chain without a traced caller, twice from the same stack level.
      tracery_graph_events_reset()
      #expect(tracery_tail_top(5) == 34)
      #expect(tracery_tail_top(1) == 10)
      #expect(TailFixture.events().map(\.depth) == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0])
      #expect(GraphThreads.depth == 0)
    }

    @Test func aTailCallThroughUntracedCodeKeepsTheCallersFrame() throws {
      let link = try GraphFixture.attachRecording(
        tracer, to: .addresses([TailFixture.via, TailFixture.leaf]), cookie: 2)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_tail_via(1) == 46)
      let events = TailFixture.events()
      #expect(events.map(\.site) == [TailFixture.via, TailFixture.leaf, TailFixture.leaf, TailFixture.via])
      #expect(events.map(\.depth) == [0, 1, 1, 0])
      #expect(events.filter { $0.kind == 2 }.map(\.value) == [46, 46])
      #expect(GraphThreads.depth == 0)
    }

    /// Swift's async functions pop an 8-byte argument area with their return (`ret 8`): the
    /// return reaches the graph 8 bytes above the frame's stack arguments, and still finds its
    /// frame (before, no frame matched and the program stopped at the corrupt-stack `ud2`); a
    /// tail call between two of them keeps both frames. With patch sites, and without (each
    /// traced through its relocated prologue or an int3: the images that keep every register).
    @Test(arguments: [false, true])
    func swiftAsyncFunctionsReturnThroughTheGraph(withoutPatchSites: Bool) throws {
      let fixture = AsyncFixture(plain: withoutPatchSites)
      let functions = fixture.functions
      #expect(TailFixture.jumps(functions[1], functions[2]))
      let tracer = Tracer()
      tracer.relocatesPrologues = withoutPatchSites
      let link = try GraphFixture.attachRecording(tracer, to: .addresses(functions), cookie: 5)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(fixture.run(5) == 10)
      #expect(fixture.run(-1) == 4)
      #expect(GraphThreads.depth == 0)
      let events = TailFixture.events()
      TailFixture.expectTwoChains(events, functions)
      #expect(events.filter { $0.kind == 2 && $0.depth == 0 }.map(\.value) == [10, 4])
      // Called as the executor calls: the word above the return address is the caller's (before,
      // the return wrote the real return address over it).
      #expect(tracery_async_checked_call(5, fixture.mid, 0, 8) == 10)
      #expect(GraphThreads.depth == 0)
    }

    /// A Swift tail call to a callee with fewer stack arguments copies the return address up and
    /// jumps: the callee's entry sees its tail caller's frame with stack arguments below its own
    /// and keeps it (its return address is that frame's stub), and its return hands its stack
    /// arguments to that frame, so the caller's return (8 bytes popped) finds it (before, the
    /// frame was dropped as stale, and its stub's return later found nothing: the toolchain's
    /// `swift package describe` stopped at the corrupt-shadow-stack `ud2`). Without patch sites
    /// (relocated or int3), and the C leaf with its NOP site too.
    @Test func aTailCallThatMovesTheReturnAddressUpKeepsBothFrames() throws {
      try Self.movedReturnAddresses(down: false)
    }

    /// The same the other way: a tail call to a callee with more stack arguments moves the
    /// return address down (the callee's entry sees a live caller above it), and that callee's
    /// tail call moves it back up; each return into a tail caller's stub hands it the stack
    /// arguments the return came from.
    @Test func aTailCallThatMovesTheReturnAddressDownKeepsEveryFrame() throws {
      try Self.movedReturnAddresses(down: true)
    }

    static func movedReturnAddresses(down: Bool) throws {
      typealias Asm = @convention(c) () -> Void
      let first = down ? [tracery_async_grower as Asm, tracery_async_mover] : [tracery_async_mover as Asm]
      let functions = first.map { entryAddress($0) } + [AsyncFixture(plain: true).functions[2]]
      let callee = UnsafeRawPointer(bitPattern: UInt(functions[0]))
      // The mover takes an argument (2 here) and pops 24; the grower passes 2 itself and pops 8.
      let (argument, popped) = down ? (0, 8) : (2, 24)
      #expect(tracery_async_checked_call(5, callee, argument, popped) == 10)
      let tracer = Tracer()
      tracer.relocatesPrologues = true
      let link = try GraphFixture.attachRecording(tracer, to: .addresses(functions), cookie: 7)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_async_checked_call(5, callee, argument, popped) == 10)
      #expect(tracery_async_checked_call(1, callee, argument, popped) == 6)
      #expect(GraphThreads.depth == 0)
      TailFixture.expectTwoChains(TailFixture.events(), functions)
    }

    /// Exit handlers on functions that return with `ret 8` (Swift's async convention): the
    /// trampoline that calls the body finds rsp 8 higher after the call, and returns so that the
    /// caller's stack is as the body's `ret 8` would leave it (before, the caller's rsp was 8 off
    /// and it crashed). Per-function trampolines, with and without patch sites, and multi-attach.
    @Test(arguments: [false, true])
    func exitHandlersOnFunctionsThatPopTheirArgumentArea(withoutPatchSites: Bool) throws {
      let fixture = AsyncFixture(plain: withoutPatchSites)
      let functions = Array(fixture.functions.dropFirst())
      let tracer = Tracer()
      tracer.relocatesPrologues = withoutPatchSites
      let call = fixture.run
      let model = FunctionModel(integerArguments: 1, stackArgumentWords: 0, returns: .integer)
      let exits = try tracer.attach(.exit(Handlers.exit), to: .addresses(functions), cookie: 5, model: model)
      tracery_fixture_records_reset()
      #expect(call(5) == 10)
      #expect(call(7) == 12)
      #expect(records().map(\.function) == [functions[1], functions[0], functions[1], functions[0]])
      #expect(tracery_async_checked_call(5, fixture.mid, 0, 8) == 10)
      exits.detach()
      guard !withoutPatchSites else { return }
      for strategy in [MultiStrategy.global(.hash), .automatic] {
        let multi = try tracer.attachMulti(
          .exit(Handlers.exit), to: .addresses(functions), cookie: { $0 & 0xffff }, model: model, strategy: strategy)
        tracery_fixture_records_reset()
        #expect(call(5) == 10)
        #expect(call(7) == 12)
        #expect(records().count == 4)
        #expect(tracery_async_checked_call(5, fixture.mid, 0, 8) == 10)
        multi.detach()
      }
    }

    @Test func mutualRecursionThroughTailCalls() throws {
      let link = try tracer.attachGraph(
        .handlers(entry: GraphFixture.countEntry, exit: GraphFixture.countExit),
        to: .addresses([TailFixture.even, TailFixture.odd]))
      defer { link.detach() }
      let entries = tracery_graph_counted_entries()
      let exits = tracery_graph_counted_exits()
      #expect(tracery_tail_even(10) == 1)
      #expect(tracery_tail_even(5_001) == 0)
      #expect(GraphThreads.depth == 0)
      #expect(tracery_graph_counted_entries() - entries == 11 + 5_002)
      #expect(tracery_graph_counted_exits() - exits == 11 + 5_002)

      let recording = try GraphFixture.attachRecording(
        tracer, to: .addresses([TailFixture.even, TailFixture.odd]), cookie: 3)
      defer { recording.detach() }
      tracery_graph_events_reset()
      #expect(tracery_tail_odd(3) == 1)
      let mine = TailFixture.events().filter { $0.kind == 2 || $0.kind == 1 }
      #expect(
        mine.filter { $0.kind == 1 }.map(\.site) == [
          TailFixture.odd, TailFixture.even, TailFixture.odd, TailFixture.even,
        ])
      #expect(mine.filter { $0.kind == 2 }.map(\.depth) == [3, 2, 1, 0])
      #expect(mine.filter { $0.kind == 2 }.map(\.value) == [1, 1, 1, 1])
    }

    @Test func longjmpOutOfATailChainThenACallFromTheSameLevel() throws {
      let functions = [TailFixture.longjmp, TailFixture.jumperMid, TailFixture.jumperLeaf, TailFixture.leaf]
      let link = try GraphFixture.attachRecording(tracer, to: .addresses(functions), cookie: 4)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_tail_longjmp(4) == 13)
      #expect(GraphThreads.depth == 0)
      let events = TailFixture.events()
      // jumper_mid and jumper_leaf ended by longjmp (no exits); leaf's call from the same stack
      // level drops them, and its exit and longjmp's pair up.
      #expect(
        events.map(\.site)
          == [TailFixture.longjmp, TailFixture.jumperMid, TailFixture.jumperLeaf, TailFixture.leaf]
          + [TailFixture.leaf, TailFixture.longjmp])
      #expect(events.map(\.kind) == [1, 1, 1, 1, 2, 2])
      #expect(events.map(\.depth) == [0, 1, 2, 1, 1, 0])
      #expect(events.filter { $0.kind == 2 }.map(\.value) == [13, 13])
    }

    @Test func perFunctionExitAndModifyReturnHandlersOnATailChain() throws {
      let model = FunctionModel(integerArguments: 1, stackArgumentWords: 0, returns: .integer)
      let exits = try tracer.attach(.exit(Handlers.exit), to: .addresses(TailFixture.chain), cookie: 5, model: model)
      tracery_fixture_records_reset()
      #expect(tracery_tail_top(5) == 34)
      var seen = records()
      #expect(seen.map(\.function) == [TailFixture.leaf, TailFixture.mid, TailFixture.top])
      #expect(seen.map { $0.return_value.0 } == [34, 34, 34])

      // A modify-return handler on the callee: every caller of the chain returns its value.
      let skip = try tracer.attach(
        .modifyReturn(Handlers.modify), to: .address(TailFixture.leaf), cookie: 77, model: model)
      tracery_fixture_records_reset()
      #expect(tracery_tail_top(5) == 77)
      seen = records()
      #expect(seen.map(\.kind) == [3, 2, 2, 2])
      #expect(seen.filter { $0.kind == 2 }.map { $0.return_value.0 } == [77, 77, 77])
      skip.detach()

      // With the graph on the callers too: the graph's frames and the trampolines' calls nest.
      let graph = try GraphFixture.attachRecording(
        tracer, to: .addresses([TailFixture.top, TailFixture.mid]), cookie: 6)
      tracery_graph_events_reset()
      tracery_fixture_records_reset()
      #expect(tracery_tail_outer(2) == 1016)
      #expect(TailFixture.events().map(\.depth) == [0, 1, 1, 0])
      #expect(TailFixture.events().filter { $0.kind == 2 }.map(\.value) == [16, 16])
      #expect(records().count == 3)
      #expect(GraphThreads.depth == 0)
      graph.detach()
      exits.detach()
    }

    @Test func fprobeAndMultiAttachExitsOnATailChain() throws {
      tracery_fprobe_reset()
      let probe = try tracer.registerFprobe(
        entry: FprobeFixture.entry, exit: FprobeFixture.exit, to: .addresses(TailFixture.chain), cookie: 8)
      #expect(tracery_tail_outer(5) == 1034)
      #expect(tracery_fprobe_entries(8) == 3 && tracery_fprobe_exits(8) == 3)
      #expect(tracery_fprobe_last_return(8) == 34)
      #expect(GraphThreads.depth == 0)
      probe.unregister()

      let model = FunctionModel(integerArguments: 1, stackArgumentWords: 0, returns: .integer)
      for strategy in [MultiStrategy.global(.hash), .automatic] {
        let multi = try tracer.attachMulti(
          .exit(Handlers.exit), to: .addresses(TailFixture.chain), cookie: { $0 & 0xffff }, model: model,
          strategy: strategy)
        tracery_fixture_records_reset()
        #expect(tracery_tail_top(5) == 34)
        let seen = records()
        #expect(seen.map(\.function) == [TailFixture.leaf, TailFixture.mid, TailFixture.top])
        #expect(seen.map { $0.return_value.0 } == [34, 34, 34])
        multi.detach()
      }
    }

    @Test func exceptionsThroughTailCalledFrames() throws {
      let functions = [TailFixture.throwTop, TailFixture.throwMid, TailFixture.thrower]
      let link = try GraphFixture.attachRecording(tracer, to: .addresses(functions), cookie: 9)
      defer { link.detach() }
      tracery_graph_events_reset()
      // Caught below the chain: all three unwound (entries only), nothing left on the shadow stack.
      #expect(tracery_tail_catch(200) == 202)
      #expect(GraphThreads.depth == 0)
      #expect(TailFixture.events().map(\.kind) == [1, 1, 1])
      // The same chain returning normally afterwards pairs up.
      tracery_graph_events_reset()
      #expect(tracery_tail_catch(3) == 1035)
      #expect(TailFixture.events().map(\.depth) == [0, 1, 2, 2, 1, 0])
      #expect(TailFixture.events().filter { $0.kind == 2 }.map(\.value) == [35, 35, 35])

      // Caught inside a tail-called function: its frame and its tail caller's survive.
      let catching = try GraphFixture.attachRecording(
        tracer, to: .addresses([TailFixture.intoCatcher, TailFixture.catcher]), cookie: 10)
      defer { catching.detach() }
      tracery_graph_events_reset()
      #expect(tracery_tail_into_catcher(60) == -120)
      #expect(GraphThreads.depth == 0)
      let events = TailFixture.events().filter { $0.kind == 2 }
      #expect(events.map(\.site) == [TailFixture.catcher, TailFixture.intoCatcher])
      #expect(events.map(\.value) == [-120, -120])
      #expect(tracery_tail_into_catcher(2) == 29)
    }
  }
}
