import Foundation
import Synchronization
import Testing
import TraceryFixtures
import TraceryTestSupport

@testable import TraceryCore

enum MultiFixture {
  typealias CHandler = @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void
  static let entry = Handler.entry(unsafeBitCast(tracery_multi_entry as CHandler, to: EntryHandler.self))
  static let exit = Handler.exit(unsafeBitCast(tracery_multi_exit as CHandler, to: ExitHandler.self))
  static let modifyReturn = Handler.modifyReturn(
    unsafeBitCast(
      tracery_multi_modify_return as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Int32,
      to: ModifyReturnHandler.self))

  /// 10,000 generated functions with 8 bytes of NOP padding before each entry.
  static let padded: Result<GeneratedLibrary.Loaded, any Error> = Result {
    try GeneratedLibrary.load(count: 10_000, prefix: "tr_m", flags: ["-fpatchable-function-entry=13,8"])
  }

  static func cookie(tag: UInt64) -> (UInt64) -> UInt64 { { $0 << 4 | tag } }

  /// The exit handler on `sites` with cookies of `tag` (the generated functions' model).
  static func attachExits(
    _ tracer: Tracer, to sites: [UInt64], tag: UInt64, lookup: MultiLookup
  ) throws -> MultiLink {
    try tracer.attachMulti(
      exit, to: .addresses(sites), cookie: cookie(tag: tag),
      model: FunctionModel(integerArguments: 1, stackArgumentWords: 0, returns: .integer), strategy: .global(lookup))
  }

  /// Two threads calling every function of `library` until `stop()`, which returns how many of
  /// their passes saw a wrong value.
  struct Callers {
    private final class Flags: Sendable {
      let running = Atomic<Bool>(true)
      let wrong = Atomic<Int>(0)
    }
    private let flags = Flags()
    private let threads: [Thread]

    init(_ library: GeneratedLibrary.Loaded) {
      let flags = flags
      threads = (0..<2).map { _ in
        Thread {
          while flags.running.load(ordering: .relaxed) {
            if !MultiFixture.callAll(library) { flags.wrong.add(1, ordering: .relaxed) }
          }
        }
      }
      for thread in threads { thread.start() }
    }

    func stop() -> Int {
      flags.running.store(false, ordering: .relaxed)
      while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
      return flags.wrong.load(ordering: .relaxed)
    }
  }

  /// Calls every function once; true when each returned its own value.
  static func callAll(_ library: GeneratedLibrary.Loaded, expect: (Int) -> Int = { $0 }) -> Bool {
    library.functions.indices.allSatisfy { index in
      library.functions[index](5) == expect(TestSupport.generatedValue(index: index, x: 5))
    }
  }
}

extension PatchingTests {
  @Suite(.serialized) struct MultiTests {
    let tracer = Tracer()

    @Test(arguments: [MultiLookup.padding, .hash])
    func tenThousandFunctionsInOneCall(lookup: MultiLookup) throws {
      let library = try MultiFixture.padded.get()
      tracery_multi_reset()
      let link = try tracer.attachMulti(
        MultiFixture.entry, to: .addresses(library.sites), cookie: MultiFixture.cookie(tag: 1),
        strategy: .global(lookup))
      #expect(link.sites.count == 10_000)
      // Every site calls a global trampoline of its mode (two at most: the class, per region).
      let targets = Set(library.sites.compactMap(siteTarget))
      #expect(targets.count <= 2)
      #expect(tracer.liveTrampolines.isEmpty)
      #expect(MultiFixture.callAll(library))
      #expect(tracery_multi_ok(1) == 10_000)
      #expect(tracery_multi_bad(1) == 0)
      // One bulk link: no per-function bookkeeping, and a report line per function.
      #expect(tracer.state.withLock { $0.multi.bulk.count == 1 && $0.functions.isEmpty })
      let report = link.detach()
      #expect(report.entries.count == 10_000 && report.failures.isEmpty)
      #expect(report.entries.allSatisfy { $0.outcome == .patched && $0.function.hasPrefix("tr_m") })
      #expect(library.sites.allSatisfy { TextPatcher.read($0) == TextPatcher.read(library.sites[0]) })
      #expect(library.sites.allSatisfy { siteTarget($0) == nil })
      // The padding has its NOPs back (at once, or once no thread is seen in a global
      // trampoline: another test's thread that blocks signals cannot be looked at for a while).
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
      #expect(UnsafePointer<UInt64>(bitPattern: UInt(library.sites[0] - 8))!.pointee == 0x9090_9090_9090_9090)
      #expect(MultiFixture.callAll(library))
      #expect(tracery_multi_ok(1) == 10_000)
    }

    @Test(arguments: [MultiLookup.padding, .hash])
    func exitAndModifyReturnThroughTheGlobalTrampoline(lookup: MultiLookup) throws {
      let library = try MultiFixture.padded.get()
      let model = FunctionModel(integerArguments: 1, stackArgumentWords: 0, returns: .integer)
      tracery_multi_reset()
      let exits = try MultiFixture.attachExits(tracer, to: library.sites, tag: 2, lookup: lookup)
      #expect(MultiFixture.callAll(library))
      #expect(tracery_multi_exits(2) == 10_000 && tracery_multi_ok(2) == 10_000)
      // Modify-return on the first hundred: they return 4242 and skip their bodies; exits still run.
      let skipped = try tracer.attachMulti(
        MultiFixture.modifyReturn, to: .addresses(Array(library.sites.prefix(100))), model: model,
        strategy: .global(lookup))
      #expect(library.functions.prefix(100).allSatisfy { $0(5) == 4242 })
      #expect(library.functions[100](5) == TestSupport.generatedValue(index: 100, x: 5))
      #expect(tracery_multi_exits(2) == 10_101)
      skipped.detach()
      exits.detach()
      #expect(library.sites.allSatisfy { siteTarget($0) == nil })
      // A modify-return handler alone (the trampoline's path without loops), skipping the body
      // on some functions and letting it run on others.
      let first = Array(library.sites.prefix(200))
      let passing = Set(first.enumerated().filter { $0.offset % 2 == 0 }.map(\.element))
      let alone = try tracer.attachMulti(
        MultiFixture.modifyReturn, to: .addresses(first), cookie: { $0 << 4 | (passing.contains($0) ? 14 : 13) },
        model: model, strategy: .global(lookup))
      let results = library.functions.prefix(200).map { $0(5) }
      let skippedCount = results.indices.count(where: { results[$0] == 4242 })
      let ran = results.indices.filter { results[$0] != 4242 }
      #expect(skippedCount == 100 && ran == Array(stride(from: 0, to: 200, by: 2)))
      #expect(ran.allSatisfy { results[$0] == TestSupport.generatedValue(index: $0, x: 5) })
      #expect(tracery_multi_ok(14) == ran.count && tracery_multi_bad(14) == 0)
      alone.detach()
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
    }

    /// An exit link's sites each jump to a stub of their own (`MultiStub`: call the trampoline,
    /// ret, the site, the record), so that calls and returns pair up; the stubs of a region share one
    /// trampoline. Attached and detached over and over while two threads call: every call
    /// returns its own value, every exit sees its own function, and at the end the stubs are
    /// freed and the padding has its NOPs back. (Storm: 4 cycles, TRACERY_LONG_TESTS=1 for 100.)
    @Test func exitLinksGoThroughStubsWhileTwoThreadsCall() throws {
      let library = try MultiFixture.padded.get()
      tracery_multi_reset()
      let callers = MultiFixture.Callers(library)
      for cycle in 0..<TestSupport.stormIterations(default: 4, long: 100) {
        let lookup: MultiLookup = cycle % 2 == 0 ? .padding : .hash
        let link = try MultiFixture.attachExits(tracer, to: library.sites, tag: 9, lookup: lookup)
        #expect(link.sites.count == library.sites.count)
        let stubs = library.sites.map { TextPatcher.read($0).first == 0xe9 ? siteTarget($0) : nil }
        #expect(stubs.allSatisfy { $0 != nil } && Set(stubs).count == library.sites.count)
        #expect(Set(stubs.compactMap { $0.map(MultiStub.trampoline(of:)) }).count <= 2)
        #expect(
          zip(library.sites, stubs).allSatisfy { site, stub in
            MultiStub.site(of: stub!) == site
              && siteTarget(stub! + UInt64(MultiStub.bodyOffset)) == PatchSite.nop(at: site).resume
          })
        usleep(2_000)
        #expect(link.detach().failures.isEmpty)
      }
      #expect(callers.stop() == 0)
      #expect(tracery_multi_bad(9) == 0 && tracery_multi_exits(9) > 0)
      #expect(library.sites.allSatisfy { siteTarget($0) == nil })
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
      let padding = library.sites.map { UnsafePointer<UInt64>(bitPattern: UInt($0 - 8))!.pointee }
      #expect(padding.allSatisfy { $0 == 0x9090_9090_9090_9090 })
    }

    /// Functions of an exit bulk link that an entry link also selects leave the bulk link for
    /// the general bookkeeping with a stub of their own; when the exit link leaves, they call
    /// the entry trampoline directly again (no stub), and the others get their NOPs back.
    @Test(arguments: [MultiLookup.padding, .hash])
    func exitAndEntryLinksSharingFunctions(lookup: MultiLookup) throws {
      let library = try MultiFixture.padded.get()
      tracery_multi_reset()
      let exits = try MultiFixture.attachExits(tracer, to: library.sites, tag: 10, lookup: lookup)
      let shared = Array(library.sites.prefix(100))
      let entries = try tracer.attachMulti(
        MultiFixture.entry, to: .addresses(shared), cookie: MultiFixture.cookie(tag: 11), strategy: .global(lookup))
      #expect(tracer.state.withLock { $0.functions.count } == 100)
      #expect(shared.allSatisfy { TextPatcher.read($0).first == 0xe9 })
      #expect(MultiFixture.callAll(library))
      #expect(tracery_multi_exits(10) == 10_000 && tracery_multi_ok(11) == 100)
      exits.detach()
      #expect(shared.allSatisfy { TextPatcher.read($0).first == 0xe8 })
      #expect(library.sites.dropFirst(100).allSatisfy { siteTarget($0) == nil })
      #expect(MultiFixture.callAll(library))
      #expect(tracery_multi_exits(10) == 10_000 && tracery_multi_ok(11) == 200)
      #expect(tracery_multi_bad(10) == 0 && tracery_multi_bad(11) == 0)
      entries.detach()
      #expect(library.sites.allSatisfy { siteTarget($0) == nil })
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
      let padding = library.sites.map { UnsafePointer<UInt64>(bitPattern: UInt($0 - 8))!.pointee }
      #expect(padding.allSatisfy { $0 == 0x9090_9090_9090_9090 })
    }

    /// In hash mode an exit stub holds its function's record (`MultiStub.recordOffset`), so its
    /// trampoline looks nothing up: a bulk link's stubs their link's records; a function that
    /// leaves the link its record in the general table, in a stub of its own, while the stub it
    /// left holds 0 (the link's records must not be reachable from a word once retired); and the
    /// stubs of a detached link hold 0 before their records are retired.
    @Test func hashStubsLeadStraightToTheirRecords() throws {
      let library = try MultiFixture.padded.get()
      tracery_multi_reset()
      let sites = Array(library.sites.prefix(1_000))
      func records(_ stub: UInt64) -> [UInt64: UInt64]? {
        let record = UnsafePointer<UInt64>(bitPattern: UInt(stub + UInt64(MultiStub.recordOffset)))!.pointee
        guard record != 0, let words = UnsafePointer<UInt64>(bitPattern: UInt(record)) else { return nil }
        let count = Int(words[1] + words[2] + words[3])
        return Dictionary(uniqueKeysWithValues: (0..<count).map { (words[5 + 2 * $0], words[4 + 2 * $0]) })
      }
      let exit = MultiFixture.exit.address
      let exits = try MultiFixture.attachExits(tracer, to: sites, tag: 12, lookup: .hash)
      let linkStubs = try sites.map { try #require(siteTarget($0)) }
      #expect(zip(sites, linkStubs).allSatisfy { site, stub in records(stub) == [site << 4 | 12: exit] })
      // Ten functions leave the link: a modify-return handler joins their exit handler.
      let moved = Array(sites.prefix(10))
      let skipping = try tracer.attachMulti(
        MultiFixture.modifyReturn, to: .addresses(moved), cookie: MultiFixture.cookie(tag: 13),
        model: FunctionModel(integerArguments: 1, stackArgumentWords: 0, returns: .integer), strategy: .global(.hash))
      let ownStubs = try moved.map { try #require(siteTarget($0)) }
      let modifyReturn = MultiFixture.modifyReturn.address
      #expect(
        zip(moved, ownStubs).allSatisfy { site, stub in
          records(stub) == [site << 4 | 12: exit, site << 4 | 13: modifyReturn]
        })
      #expect(linkStubs.prefix(10).allSatisfy { records($0) == nil })
      #expect(zip(sites, linkStubs).dropFirst(10).allSatisfy { records($1) == [$0 << 4 | 12: exit] })
      #expect(library.functions.prefix(10).allSatisfy { $0(5) == 4242 })
      #expect(
        library.functions.dropFirst(10).prefix(990).indices.allSatisfy {
          library.functions[$0](5) == TestSupport.generatedValue(index: $0, x: 5)
        })
      #expect(tracery_multi_exits(12) == 1_000 && tracery_multi_bad(12) == 0)
      skipping.detach()
      exits.detach()
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
      // Detached with nothing freed since (a pass just now: the next is not due): the link's stubs
      // are retired, not yet freed, and hold 0. (Should a pass free them first, their memory
      // may hold anything: then only that they were retired is checked.)
      let again = try MultiFixture.attachExits(tracer, to: sites, tag: 14, lookup: .hash)
      let againStubs = try sites.map { try #require(siteTarget($0)) }
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
      again.detach()
      let words = againStubs.map { records($0) }
      let retired = tracer.state.withLock { state in
        againStubs.allSatisfy { stub in state.reclaimer.retired.contains { $0.block.range.contains(stub) } }
      }
      #expect(!retired || words.allSatisfy { $0 == nil })
      #expect(sites.allSatisfy { siteTarget($0) == nil })
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
    }

    @Test func multiAndPerFunctionAttachmentsOnTheSameFunctions() throws {
      let library = try MultiFixture.padded.get()
      tracery_multi_reset()
      let multi = try tracer.attachMulti(
        MultiFixture.entry, to: .addresses(library.sites), cookie: MultiFixture.cookie(tag: 3),
        strategy: .global(.automatic))
      // A per-function trampoline on 50 of them runs both handlers; the others stay global.
      let single = try tracer.attach(
        MultiFixture.entry, to: .addresses(Array(library.sites.prefix(50))), cookie: 0)
      #expect(MultiFixture.callAll(library))
      #expect(tracery_multi_ok(3) == 10_000)
      #expect(tracery_multi_bad(0) == 50)  // cookie 0 names no function: counted as "bad" on tag 0
      single.detach()
      #expect(MultiFixture.callAll(library))
      #expect(tracery_multi_ok(3) == 20_000 && tracery_multi_bad(0) == 50)
      multi.detach()
    }

    /// A function of a bulk link that a graph user (or an fprobe) attaches to leaves the link for
    /// the general bookkeeping, keeps its multi handler, and is restored when all are gone.
    @Test func aGraphUserAndAnFprobeJoinFunctionsOfABulkLink() throws {
      tracery_multi_reset()
      let functions = [GraphFixture.outer, GraphFixture.middle, GraphFixture.inner]
      let multi = try tracer.attachMulti(
        MultiFixture.entry, to: .addresses(functions), cookie: MultiFixture.cookie(tag: 6), strategy: .global(.hash))
      #expect(tracer.state.withLock { $0.multi.bulk.first?.sites.count } == 3)
      #expect(tracery_graph_outer(5) == 17)
      #expect(tracery_multi_ok(6) == 3)
      let graph = try GraphFixture.attachRecording(tracer, to: .address(GraphFixture.middle), cookie: 8)
      #expect(tracer.state.withLock { $0.multi.bulk.first?.sites.count } == 2)
      tracery_graph_events_reset()
      #expect(tracery_graph_outer(5) == 17)
      #expect(tracery_multi_ok(6) == 6 && tracery_multi_bad(6) == 0)
      #expect(GraphFixture.events.map(\.kind) == [1, 2])
      #expect(Set(multi.sites).count == 3)
      graph.detach()
      #expect(tracery_graph_outer(5) == 17)
      #expect(tracery_multi_ok(6) == 9)
      // An entry-only fprobe (an ops) on another of them: both run there too.
      tracery_fprobe_reset()
      let probe = try tracer.registerFprobe(
        entry: FprobeFixture.entry, exit: nil, to: .address(GraphFixture.inner), cookie: 11)
      #expect(tracery_graph_outer(5) == 17)
      #expect(tracery_fprobe_entries(11) == 1 && tracery_multi_ok(6) == 12)
      probe.unregister()
      #expect(tracer.state.withLock { $0.multi.bulk.first?.sites.count } == 1)
      multi.detach()
      #expect(functions.allSatisfy { siteTarget($0) == nil })
      #expect(tracery_graph_outer(5) == 17 && tracery_multi_ok(6) == 12)
    }

    /// Bulk links attached and detached over and over while two threads call every function:
    /// every call returns its own value, every handler call sees its own cookie, and at the end
    /// the padding has its NOPs back and everything retired is freed. (Storm: 4 cycles by
    /// default, TRACERY_LONG_TESTS=1 for 100.)
    @Test func bulkAttachDetachCyclesWhileTwoThreadsCall() throws {
      let library = try MultiFixture.padded.get()
      tracery_multi_reset()
      let callers = MultiFixture.Callers(library)
      let cycles = TestSupport.stormIterations(default: 4, long: 100)
      for cycle in 0..<cycles {
        let lookup: MultiLookup = cycle % 2 == 0 ? .padding : .hash
        let link = try tracer.attachMulti(
          MultiFixture.entry, to: .addresses(library.sites), cookie: MultiFixture.cookie(tag: 7),
          strategy: .global(lookup))
        #expect(link.sites.count == library.sites.count)
        usleep(2_000)
        #expect(link.detach().failures.isEmpty)
      }
      #expect(callers.stop() == 0)
      #expect(tracery_multi_bad(7) == 0)
      #expect(library.sites.allSatisfy { siteTarget($0) == nil })
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
      let padding = library.sites.map { UnsafePointer<UInt64>(bitPattern: UInt($0 - 8))!.pointee }
      #expect(padding.allSatisfy { $0 == 0x9090_9090_9090_9090 })
    }

    /// Entry handlers on functions built without patch sites (gcc -O2 -fcf-protection=full:
    /// each starts with `endbr64`, its site 4 bytes on), through the global strategy, in
    /// tracery-testhost (whose threads can all be moved out of a prologue; in this process the
    /// test runner's threads block the signal, and such functions get int3 sites instead): every
    /// one joins a bulk link through its `PrologueStub` (none enters the general bookkeeping) in
    /// nearly every cycle, attached and detached 50 times while two threads call them all; 5,000
    /// of them, so that each attach decides their prologues in two halves at once (`Halves`).
    /// Every call returns its own
    /// value, every handler call names its function's entry, and every detach puts the first
    /// bytes back.
    @Test func relocatedFunctionsJoinABulkLinkWhileTwoThreadsCall() throws {
      let directory = try TestSupport.temporaryDirectory("tracery-multi-relocated")
      defer { try? FileManager.default.removeItem(at: directory) }
      let source = directory.appendingPathComponent("gen.c").path
      let library = directory.appendingPathComponent("libgen.so").path
      try TestSupport.writeGeneratedFunctions(count: 5_000, prefix: "tr_q", to: source)
      #expect(5_000 >= Halves.minimum)
      try TestSupport.compile(
        compiler: "gcc", sources: [source], flags: ["-O2", "-fcf-protection=full", "-shared", "-fPIC"],
        output: library)
      let host = TestSupport.productsDirectory.appendingPathComponent("tracery-testhost").path
      let result = try TestSupport.run(host, ["relocate-multi", library, "tr_q"])
      #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
      let fields = TestSupport.fields(of: result.stdout)
      #expect(
        fields["joined"] == "50" && fields["restored"] == "50" && fields["wrong"] == "0" && fields["bad"] == "0"
          && fields["called"] == "true", "\(result.stdout)")
      // A cycle that began while a caller was in a signal handler (the snapshot signal blocked)
      // gives the functions int3 sites instead, through the general path: rare.
      #expect(Int(fields["bulk"] ?? "") ?? 0 >= 40, "\(result.stdout)")
    }

    /// Padding another tracer left at 0 (it could not put the NOPs back while a thread was in its
    /// global trampoline) is usable padding for this one, and gets its NOPs back at the end.
    @Test func paddingZeroedByAnotherTracerIsUsable() throws {
      let library = try MultiFixture.padded.get()
      let sites = Array(library.sites.prefix(64))
      let padding = sites.map { $0 - 8 }
      #expect(TextPatcher.shared.writeWords(padding.map { ($0, 0) }).isEmpty)
      ZeroedPadding.add(padding)
      tracery_multi_reset()
      let link = try tracer.attachMulti(
        MultiFixture.entry, to: .addresses(sites), cookie: MultiFixture.cookie(tag: 8), strategy: .global(.padding))
      #expect(link.sites.count == sites.count)
      #expect(
        library.functions.prefix(64).indices.allSatisfy {
          library.functions[$0](5) == TestSupport.generatedValue(index: $0, x: 5)
        })
      #expect(tracery_multi_ok(8) == 64)
      link.detach()
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
      #expect(padding.allSatisfy { UnsafePointer<UInt64>(bitPattern: UInt($0))!.pointee == 0x9090_9090_9090_9090 })
    }

    @Test func paddingModeOnAFunctionWithoutPaddingSaysSo() throws {
      let error = #expect(throws: AttachError.self) {
        try tracer.attachMulti(MultiFixture.entry, to: .address(OpsFixture.f1), strategy: .global(.padding))
      }
      #expect(
        "\(String(describing: error))".contains("-fpatchable-function-entry=13,8"), "\(String(describing: error))")
      #expect(siteTarget(OpsFixture.f1) == nil)
      // The hash needs no padding.
      let link = try tracer.attachMulti(MultiFixture.entry, to: .address(OpsFixture.f1), strategy: .global(.hash))
      #expect(link.sites == [OpsFixture.f1])
      link.detach()
    }

    /// The detached half's records are freed only once no caller can still reach them (padding
    /// readers hold the record; hash readers the table that leads to it).
    @Test(arguments: [MultiLookup.automatic, .hash])
    func halfDetachedWhileTwoThreadsCallAll(firstLookup: MultiLookup) throws {
      let library = try MultiFixture.padded.get()
      tracery_multi_reset()
      let first = try tracer.attachMulti(
        MultiFixture.entry, to: .addresses(Array(library.sites.prefix(5_000))), cookie: MultiFixture.cookie(tag: 4),
        strategy: .global(firstLookup))
      let second = try tracer.attachMulti(
        MultiFixture.entry, to: .addresses(Array(library.sites.suffix(5_000))), cookie: MultiFixture.cookie(tag: 5),
        strategy: .global(.hash))
      let callers = MultiFixture.Callers(library)
      usleep(20_000)
      first.detach()
      let afterDetach = tracery_multi_ok(4)
      usleep(20_000)
      #expect(callers.stop() == 0)
      #expect(tracery_multi_bad(4) == 0 && tracery_multi_bad(5) == 0)
      // Calls already inside a trampoline when it was detached may still finish counting.
      #expect(tracery_multi_ok(4) <= afterDetach + 2)
      #expect(tracery_multi_ok(5) > 5_000)
      second.detach()
      tracer.reclaim()
      #expect(tracer.retiredTrampolines == 0, "\(tracer.reclaimObstacle ?? "")")
    }
  }
}
