import Foundation
import Testing
import TraceryCxxFixtures
import TraceryFixtures
import TraceryTestSupport

@testable import TraceryCore

/// The entry address of a C function.
func entryAddress<T>(_ function: T) -> UInt64 {
  UInt64(UInt(bitPattern: unsafeBitCast(function, to: UnsafeRawPointer.self)))
}

enum GraphFixture {
  typealias Unary = @convention(c) (Int) -> Int
  static let outer = entryAddress(tracery_graph_outer as Unary)
  static let middle = entryAddress(tracery_graph_middle as Unary)
  static let inner = entryAddress(tracery_graph_inner as Unary)
  static let recurse = entryAddress(tracery_graph_recurse as Unary)
  static let longjmp = entryAddress(tracery_graph_longjmp as Unary)

  /// A graph user whose handlers record events (`events`), with one data word.
  static func attachRecording(_ tracer: Tracer, to selector: FunctionSelector, cookie: UInt64) throws -> GraphLink {
    try tracer.attachGraph(.handlers(entry: entry, exit: exit), to: selector, cookie: cookie, dataWords: 1)
  }
  static let leaf = entryAddress(tracery_graph_leaf as Unary)
  static let altOuter = entryAddress(tracery_graph_alt_outer as Unary)
  static let altEscape = entryAddress(tracery_graph_alt_escape as Unary)
  static let coStart = entryAddress(tracery_graph_co_start as Unary)
  static let coInner = entryAddress(tracery_graph_co_inner as Unary)
  static let signal = entryAddress(tracery_graph_signal as Unary)

  /// The C handlers as Swift imports them (optional pointers), to cast to Tracery's types.
  typealias CEntry =
    @convention(c) (
      UnsafeMutablePointer<tracery_graph_frame>?, UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<tracery_call>?,
      UInt64
    ) -> Int32
  typealias CExit =
    @convention(c) (
      UnsafeMutablePointer<tracery_graph_frame>?, UnsafeMutablePointer<UInt64>?, UnsafeMutablePointer<tracery_call>?,
      UInt64
    ) -> Void

  static let entry = unsafeBitCast(tracery_graph_entry_record as CEntry, to: GraphEntryHandler.self)
  static let exit = unsafeBitCast(tracery_graph_exit_record as CExit, to: GraphExitHandler.self)
  static let countEntry = unsafeBitCast(tracery_graph_count_entry as CEntry, to: GraphEntryHandler.self)
  static let countExit = unsafeBitCast(tracery_graph_count_exit as CExit, to: GraphExitHandler.self)
  static let decline = unsafeBitCast(tracery_graph_entry_decline as CEntry, to: GraphEntryHandler.self)
  static let clobberEntry = unsafeBitCast(tracery_graph_entry_clobber as CEntry, to: GraphEntryHandler.self)
  static let clobberExit = unsafeBitCast(tracery_graph_exit_clobber as CExit, to: GraphExitHandler.self)
  static let mix = entryAddress(tracery_graph_mix as @convention(c) (Int, Double, Int, Double) -> Double)
  static let mixModel = FunctionModel(integerArguments: 2, floatArguments: 2, returns: .double)

  static var events: [tracery_graph_event] {
    (0..<Int(tracery_graph_events_count())).map { tracery_graph_event_at(Int32($0)) }
  }
}

extension PatchingTests {
  @Suite(.serialized) struct GraphTests {
    let tracer = Tracer()

    @Test func threeUsersGetMatchedPairsAndTheirOwnData() throws {
      let functions = [GraphFixture.outer, GraphFixture.middle, GraphFixture.inner]
      let links = try (1...3).map { cookie in
        try tracer.attachGraph(
          .handlers(entry: GraphFixture.entry, exit: GraphFixture.exit), to: .addresses(functions),
          cookie: UInt64(cookie), dataWords: 2)
      }
      defer { for link in links { link.detach() } }
      #expect(Set(links.map(\.dataOffset)) == [0, 2, 4])
      tracery_graph_events_reset()
      #expect(tracery_graph_outer(5) == 17)
      #expect(GraphThreads.depth == 0)
      let events = GraphFixture.events
      #expect(events.count == 18)
      for cookie in UInt64(1)...3 {
        let mine = events.filter { $0.cookie == cookie }
        #expect(mine.map(\.kind) == [1, 1, 1, 2, 2, 2])
        #expect(mine.map(\.depth) == [0, 1, 2, 2, 1, 0])
        // The exit sees the data its own entry left, whatever the other users wrote.
        #expect(mine.filter { $0.kind == 2 }.map(\.data) == [cookie * 1000 + 2, cookie * 1000 + 1, cookie * 1000])
        #expect(mine.filter { $0.kind == 2 }.map(\.return_value) == [8, 16, 17])
      }
    }

    @Test func usersWithoutVectorRegistersGetTheSamePairs() throws {
      let link = try tracer.attachGraph(
        .handlers(entry: GraphFixture.entry, exit: GraphFixture.exit),
        to: .addresses([GraphFixture.outer, GraphFixture.middle, GraphFixture.inner]), cookie: 9, dataWords: 1,
        vectorRegisters: false)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_graph_outer(5) == 17)
      #expect(GraphFixture.events.map(\.kind) == [1, 1, 1, 2, 2, 2])
      #expect(GraphFixture.events.filter { $0.kind == 2 }.map(\.return_value) == [8, 16, 17])
      #expect(GraphThreads.depth == 0)
    }

    @Test func anEntryThatDeclinesGetsNoExit() throws {
      let link = try tracer.attachGraph(
        .handlers(entry: GraphFixture.decline, exit: GraphFixture.exit), to: .address(GraphFixture.leaf))
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_graph_leaf(4) == 40)
      #expect(GraphFixture.events.map(\.kind) == [1])
      #expect(GraphThreads.depth == 0)
    }

    @Test func longjmpOutOfThreeTracedLevels() throws {
      let functions = [GraphFixture.outer, GraphFixture.middle, GraphFixture.inner, GraphFixture.longjmp]
      let link = try GraphFixture.attachRecording(tracer, to: .addresses(functions), cookie: 7)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_graph_longjmp(0) == 9)
      #expect(GraphThreads.depth == 0)
      let events = GraphFixture.events
      // longjmp: entry, outer, middle, inner (left by longjmp), then outer(1)'s three pairs at
      // depths 1-3, and longjmp's exit.
      #expect(events.map(\.kind) == [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2])
      #expect(events.map(\.depth) == [0, 1, 2, 3, 1, 2, 3, 3, 2, 1, 0])
      #expect(events.last?.return_value == 9)
    }

    @Test func tracedCallsFromASignalHandler() throws {
      let functions = [GraphFixture.outer, GraphFixture.middle, GraphFixture.inner, GraphFixture.signal]
      let link = try GraphFixture.attachRecording(tracer, to: .addresses(functions), cookie: 3)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_graph_signal(1) == 8 + 11)
      #expect(GraphThreads.depth == 0)
      let events = GraphFixture.events
      // signal, middle, inner, then (in the handler, nested below signal's frame) outer, middle,
      // inner, then signal's exit: every entry has its exit, in order.
      #expect(events.map(\.kind) == [1, 1, 1, 2, 2, 1, 1, 1, 2, 2, 2, 2])
      #expect(events.map(\.depth) == [0, 1, 2, 2, 1, 1, 2, 3, 3, 2, 1, 0])
      #expect(events.last?.return_value == 19)
    }

    @Test func timerSignalsLandingAnywhereInTracedCalls() throws {
      let link = try tracer.attachGraph(
        .handlers(entry: GraphFixture.countEntry, exit: GraphFixture.countExit),
        to: .addresses([GraphFixture.outer, GraphFixture.middle, GraphFixture.inner, GraphFixture.leaf]))
      defer { link.detach() }
      let calls = TestSupport.stormIterations(default: 200_000, long: 20_000_000)
      let handled = tracery_graph_signal_storm(calls, 50)
      #expect(handled >= 20)
      #expect(GraphThreads.depth == 0)
      #expect(tracery_graph_counted_entries() == tracery_graph_counted_exits())
      // (The handler's own calls are not traced when the signal lands inside a graph handler,
      // which holds the recursion guard.)
      #expect(tracery_graph_counted_entries() >= 3 * calls)
    }

    @Test func aCxxExceptionThroughThreeTracedLevels() throws {
      let functions = [tracery_cxx_level1, tracery_cxx_level2, tracery_cxx_level3].map {
        entryAddress($0 as @convention(c) (Int) -> Int)
      }
      let link = try GraphFixture.attachRecording(tracer, to: .addresses(functions), cookie: 5)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_cxx_catch_levels(0) == 1123)
      #expect(tracery_cxx_catch_levels(42) == 42)
      #expect(GraphThreads.depth == 0)
      #expect(tracery_cxx_catch_levels(0) == 1123)
      let events = GraphFixture.events
      // A normal call (three pairs), the throwing call's three entries (the unwinder put their
      // return addresses back: no exits), and another normal call, balanced.
      #expect(events.map(\.kind) == [1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2])
      #expect(events.suffix(6).map(\.depth) == [0, 1, 2, 2, 1, 0])
    }

    @Test(arguments: [true, false])
    func aGraphUserAndAPerFunctionTrampolineOnOneFunction(graphFirst: Bool) throws {
      let leaf = GraphFixture.leaf
      let original = TextPatcher.read(leaf)
      func graph() throws -> GraphLink {
        try tracer.attachGraph(.handlers(entry: GraphFixture.entry, exit: GraphFixture.exit), to: .address(leaf))
      }
      func direct() throws -> Link { try tracer.attach(.entry(OpsFixture.add1000), to: .address(leaf)) }
      let user: GraphLink
      let entry: Link
      if graphFirst {
        user = try graph()
        entry = try direct()
      } else {
        entry = try direct()
        user = try graph()
      }
      tracery_graph_events_reset()
      // The graph's entry runs first (it sees 4), then the trampoline's handler (4 → 1004), the
      // body, and the graph's exit sees the result.
      #expect(tracery_graph_leaf(4) == 10040)
      #expect(GraphFixture.events.map(\.kind) == [1, 2])
      #expect(GraphFixture.events.map(\.return_value) == [4, 10040])
      #expect(GraphThreads.depth == 0)
      entry.detach()
      tracery_graph_events_reset()
      #expect(tracery_graph_leaf(4) == 40)
      #expect(GraphFixture.events.map(\.return_value) == [4, 40])
      let again = try direct()
      #expect(tracery_graph_leaf(4) == 10040)
      user.detach()
      #expect(tracery_graph_leaf(4) == 10040)
      again.detach()
      #expect(TextPatcher.read(leaf) == original)
    }

    @Test func framesThatSurviveACaughtExceptionKeepTheirExits() throws {
      let functions =
        [tracery_cxx_level1, tracery_cxx_level2, tracery_cxx_level3, tracery_cxx_traced_catcher].map {
          entryAddress($0 as @convention(c) (Int) -> Int)
        } + [GraphFixture.outer]
      let link = try GraphFixture.attachRecording(tracer, to: .addresses(functions), cookie: 6)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_cxx_traced_catcher(42) == 42)
      #expect(GraphThreads.depth == 0)
      // The catcher's exit is given (it caught the exception); the three levels it unwound get none.
      #expect(GraphFixture.events.map(\.kind) == [1, 1, 1, 1, 2])
      #expect(GraphFixture.events.map(\.depth) == [0, 1, 2, 3, 0])
      #expect(GraphFixture.events.last?.return_value == 42)
      // A rethrow from a traced frame, caught again outside: balanced, and traced calls go on.
      tracery_graph_events_reset()
      #expect(tracery_cxx_rethrow(7) == 8)
      #expect(GraphThreads.depth == 0)
      #expect(tracery_graph_outer(1) == 9)
      // level1-3 entered (unwound twice: no exits), then outer(1)'s pair at depth 0.
      #expect(GraphFixture.events.map(\.kind) == [1, 1, 1, 1, 2])
      #expect(GraphFixture.events.suffix(2).map(\.depth) == [0, 0])
      #expect(GraphFixture.events.last?.return_value == 9)
    }

    /// Handlers that overwrite every register a C function may change: the traced functions
    /// still get their arguments and hand back their results, with the default model (every
    /// register saved) and with the functions' own; the exit sees the entry's arguments (the
    /// frame is the handlers' call).
    @Test(arguments: [false, true])
    func handlersThatOverwriteRegistersChangeNothing(withModels: Bool) throws {
      let mixLink = try tracer.attachGraph(
        .handlers(entry: GraphFixture.clobberEntry, exit: GraphFixture.clobberExit), to: .address(GraphFixture.mix),
        model: withModels ? GraphFixture.mixModel : nil)
      defer { mixLink.detach() }
      let leafLink = try tracer.attachGraph(
        .handlers(entry: GraphFixture.clobberEntry, exit: GraphFixture.clobberExit), to: .address(GraphFixture.leaf),
        model: withModels ? FunctionModel(integerArguments: 1) : nil)
      defer { leafLink.detach() }
      let models = tracer.state.withLock { Set($0.graphImages.map(\.model)) }
      #expect(models == (withModels ? [GraphFixture.mixModel, FunctionModel(integerArguments: 1)] : [.unknown]))

      tracery_graph_seen_reset()
      #expect(tracery_graph_mix(3, 0.5, 4, 0.25) == 2.5)
      var seen = tracery_graph_seen_now()
      #expect(seen.entries == 1 && seen.exits == 1)
      #expect(seen.entry_arguments.0 == 3 && seen.entry_arguments.1 == 4)
      #expect(seen.entry_floats.0 == 0.5 && seen.entry_floats.1 == 0.25)
      #expect(seen.exit_argument == 3)
      #expect(seen.exit_float_return == 2.5)

      tracery_graph_seen_reset()
      #expect(tracery_graph_leaf(4) == 40)
      seen = tracery_graph_seen_now()
      #expect(seen.entries == 1 && seen.exits == 1)
      #expect(seen.entry_arguments.0 == 4 && seen.exit_argument == 4 && seen.exit_return == 40)
      #expect(GraphThreads.depth == 0)
    }

    /// A signal handler on an alternate stack that lies above the thread's stack: its traced
    /// calls must not take the live frames of the thread's stack for stale ones, and frames an
    /// escape (siglongjmp) leaves behind on the alternate stack must not break later returns.
    @Test(arguments: [false, true])
    func tracedCallsOnAnAlternateSignalStackAboveTheThreadStack(escape: Bool) throws {
      let functions = [
        GraphFixture.outer, GraphFixture.middle, GraphFixture.inner, GraphFixture.leaf, GraphFixture.altOuter,
        GraphFixture.altEscape,
      ]
      let link = try tracer.attachGraph(
        .handlers(entry: GraphFixture.countEntry, exit: GraphFixture.countExit), to: .addresses(functions))
      defer { link.detach() }
      let entries = tracery_graph_counted_entries()
      let exits = tracery_graph_counted_exits()
      #expect(tracery_graph_altstack(1, escape ? 1 : 0) == 9028)
      // alt_outer, leaf, middle, inner, then outer, middle, inner; the escape's call never returns.
      #expect(tracery_graph_counted_entries() - entries == (escape ? 8 : 7))
      #expect(tracery_graph_counted_exits() - exits == 7)
    }

    /// A coroutine suspended inside a traced call: traced calls on the thread's stack must not
    /// take its frame for a stale one, and a call that returns while it lies above keeps it.
    @Test func aCoroutineSuspendedInsideATracedCall() throws {
      let link = try tracer.attachGraph(
        .handlers(entry: GraphFixture.entry, exit: GraphFixture.exit),
        to: .addresses([GraphFixture.coStart, GraphFixture.coInner, GraphFixture.middle, GraphFixture.inner]),
        cookie: 5, dataWords: 1)
      defer { link.detach() }
      tracery_graph_events_reset()
      #expect(tracery_graph_coroutines(1) == 51)
      let events = GraphFixture.events
      let names = [
        GraphFixture.coStart: "start", GraphFixture.coInner: "co", GraphFixture.middle: "middle",
        GraphFixture.inner: "inner",
      ]
      #expect(
        events.map { "\($0.kind == 1 ? "+" : "-")\(names[$0.site] ?? "?")" } == [
          "+start", "+co", "-start", "+middle", "+inner", "-inner", "-middle", "-co",
        ])
      // Each exit sees the data its own entry left (frames moved, not mixed up).
      #expect(events.filter { $0.kind == 2 }.map(\.return_value) == [2, 4, 8, 41])
      #expect(GraphThreads.depth == 0)
    }

    /// A thread blocked inside a traced call while its user detaches: the stub it will return
    /// into and the image that stub jumps to both stay allocated until it has left.
    @Test func aBlockedCallKeepsItsStubAndImageUntilItReturns() throws {
      let block = entryAddress(tracery_graph_block as GraphFixture.Unary)
      let link = try GraphFixture.attachRecording(tracer, to: .address(block), cookie: 3)
      // The stub and the image, kept scrambled on the heap: the reclaimer scans this frame too.
      let blocks = try #require(Self.stubAndImage(tracer, site: block))
      let result = ResultBox()
      let thread = Thread { result.set(tracery_graph_block(41)) }
      thread.start()
      while tracery_fixture_blocked() == 0 { usleep(1000) }
      tracery_graph_events_reset()
      link.detach()
      _ = tracer.reclaim()
      let retired = blocks.contained(
        in: tracer.state.withLock { state in state.reclaimer.retired.map(\.block.address) })
      #expect(retired == [true, true], "the stub holds the blocked call's return address; it jumps to the image")
      tracery_fixture_release()
      while result.value == nil { usleep(1000) }
      #expect(result.value == 42)
      // A user that left is not given the exits of calls it entered.
      #expect(GraphFixture.events.isEmpty)
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
    }

    /// A coroutine suspended inside a traced call while its user detaches: no thread's stack
    /// holds the return into the stub (the coroutine's stack is in .bss), the shadow frame does.
    @Test func aSuspendedCoroutineKeepsItsStubUntilItReturns() throws {
      let link = try GraphFixture.attachRecording(tracer, to: .address(GraphFixture.coInner), cookie: 4)
      let blocks = try #require(Self.stubAndImage(tracer, site: GraphFixture.coInner))
      #expect(tracery_graph_co_begin(3) == 6)
      link.detach()
      _ = tracer.reclaim()
      let retired = blocks.contained(
        in: tracer.state.withLock { state in state.reclaimer.retired.map(\.block.address) })
      #expect(retired == [true, true], "the suspended call returns through the stub and the image")
      #expect(tracery_graph_co_finish() == 41)
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
    }

    /// Every traced return of a thread/coroutine ping-pong finds the other side's frame above its
    /// own (a rotation each time) while timer signals run traced calls anywhere, rotations
    /// included: results, matched counts, and a balanced shadow stack at the end.
    @Test func coroutinePingPongWithTimerSignals() throws {
      let functions = [
        entryAddress(tracery_graph_ping_a as GraphFixture.Unary),
        entryAddress(tracery_graph_ping_b as GraphFixture.Unary),
        GraphFixture.leaf,
      ]
      let link = try tracer.attachGraph(
        .handlers(entry: GraphFixture.countEntry, exit: GraphFixture.countExit), to: .addresses(functions))
      defer { link.detach() }
      let rounds = TestSupport.stormIterations(default: 20_000, long: 1_000_000)
      let entries = tracery_graph_counted_entries()
      let exits = tracery_graph_counted_exits()
      var timerCalls = 0
      let expected = (0..<rounds).reduce(0) { $0 + ($1 + 1) + ($1 + 2) + 10 }
      #expect(tracery_graph_ping_pong(rounds, 200, &timerCalls) == expected)
      // Every call outside the timer handler is traced; the handler's are when no count handler
      // was running (the recursion guard).
      #expect(tracery_graph_counted_entries() - entries >= 3 * rounds)
      #expect(tracery_graph_counted_entries() - entries == tracery_graph_counted_exits() - exits)
      #expect(GraphThreads.depth == 0)
    }

    /// A thread running a signal handler on its alternate stack, interrupted code inside an
    /// exit-traced function: its trampoline's return address is on a stack the reclaimer cannot
    /// find, so nothing is freed until the handler has left.
    @Test func aSignalHandlerOnAnAlternateStackHoldsOffTheReclaimer() throws {
      let spin = entryAddress(tracery_alt_spin_traced as GraphFixture.Unary)
      let link = try tracer.attach(.exit(Handlers.exit), to: .address(spin), model: FunctionModel(integerArguments: 1))
      #expect(tracery_alt_spin_start(5) == 0)
      while tracery_alt_spinning() == 0 { usleep(1000) }
      link.detach()
      _ = tracer.reclaim()
      #expect(tracer.retiredTrampolines >= 1, "the interrupted call returns through the old trampoline")
      #expect(tracer.reclaimObstacle?.contains("alternate stack") == true, "\(tracer.reclaimObstacle ?? "none")")
      #expect(tracery_alt_spin_finish() == 6)
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
    }

    /// A function that gets a model later moves to the image of that model; the image it left,
    /// which nothing calls any more, is retired rather than kept listed.
    @Test func anImageNoFunctionUsesIsRetired() throws {
      let graph = try tracer.attachGraph(
        .handlers(entry: GraphFixture.countEntry, exit: GraphFixture.countExit), to: .address(GraphFixture.leaf))
      defer { graph.detach() }
      #expect(tracer.state.withLock { $0.graphImages.map(\.model) } == [.unknown])
      let model = FunctionModel(integerArguments: 1)
      let link = try tracer.attach(.entry(Handlers.entry), to: .address(GraphFixture.leaf), model: model)
      defer { link.detach() }
      #expect(tracer.state.withLock { $0.graphImages.map(\.model) } == [model])
      #expect(tracery_graph_leaf(3) == 30)
    }

    @inline(never) static func stubAndImage(_ tracer: Tracer, site: UInt64) -> AddressBox? {
      tracer.state.withLock { state in
        state.functions[site].flatMap { function in
          function.graphStub.map { AddressBox([$0.block.address, function.graphImage!]) }
        }
      }
    }

    /// A first attach in a tracer that traces nothing (`attachFreshGraphUser`): the stubs of
    /// neighbouring sites are slices of one block, in site order, one per site however often it
    /// is named; a second user then moves every site through the general commit (new stubs),
    /// and the slices are released one by one.
    @Test func aFreshAttachSharesOneStubBlockAndLeavesTheGeneralState() throws {
      let sites = [GraphFixture.outer, GraphFixture.middle, GraphFixture.inner].sorted()
      let before = sites.map { TextPatcher.read($0) }
      // (Each site named twice, as aliases do: one state per site.)
      let first = try tracer.attachGraph(
        .handlers(entry: GraphFixture.countEntry, exit: GraphFixture.countExit), to: .addresses(sites + sites))
      #expect(tracer.state.withLock { $0.functions.count } == 3)
      // (Stub addresses stay out of this frame: the reclaimer's stack scan would see them.)
      func stubs() -> [UInt64] {
        tracer.state.withLock { state in sites.compactMap { state.functions[$0]?.graphStub?.block.address } }
      }
      let contiguous =
        stubs().count == 3
        && zip(stubs(), stubs().dropFirst()).allSatisfy { $1 == $0 + UInt64(GraphEmitter.stubSize) }
      #expect(contiguous)
      let firstStubs = AddressBox(stubs())
      let second = try GraphFixture.attachRecording(tracer, to: .addresses(sites), cookie: 7)
      #expect(stubs().count == 3 && firstStubs.isDisjoint(with: stubs()))
      tracery_graph_events_reset()
      let result = tracery_graph_outer(3)
      #expect(GraphFixture.events.count == 6, "\(GraphFixture.events.count) events for \(result)")
      first.detach()
      second.detach()
      #expect(sites.map { TextPatcher.read($0) } == before)
      #expect(tracer.state.withLock { $0.functions.isEmpty })
    }

    @Test func recursionTenThousandDeep() throws {
      let link = try tracer.attachGraph(
        .handlers(entry: nil, exit: nil), to: .address(GraphFixture.recurse))
      defer { link.detach() }
      #expect(tracery_graph_recurse(10_000) == 10_000)
      #expect(GraphThreads.depth == 0)
    }

    @Test func reservingMoreWordsThanTheFrameHoldsIsAnError() {
      #expect(throws: AttachError.graphDataExhausted(requested: 8)) {
        try tracer.attachGraph(.handlers(entry: nil, exit: nil), to: .address(GraphFixture.leaf), dataWords: 8)
      }
    }

    @Test func detachedUsersLeaveTheOriginalBytes() throws {
      let before = TextPatcher.read(GraphFixture.leaf)
      let link = try tracer.attachGraph(
        .handlers(entry: GraphFixture.entry, exit: nil), to: .address(GraphFixture.leaf))
      #expect(TextPatcher.read(GraphFixture.leaf) != before)
      #expect(link.sites == [GraphFixture.leaf])
      link.detach()
      #expect(TextPatcher.read(GraphFixture.leaf) == before)
      #expect(link.sites.isEmpty)
    }
  }
}
