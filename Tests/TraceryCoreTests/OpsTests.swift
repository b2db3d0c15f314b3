import Testing
import TraceryFixtures
import TraceryX86

@testable import TraceryCore

/// What a site holds now: nil (its original bytes), or the target of its call or jmp.
func siteTarget(_ site: UInt64) -> UInt64? { X86Instruction.branchTarget(TextPatcher.read(site), at: site) }

enum OpsFixture {
  typealias Unary = @convention(c) (Int) -> Int
  static let f1 = entryAddress(tracery_ops_f1 as Unary)
  static let f2 = entryAddress(tracery_ops_f2 as Unary)
  static let f3 = entryAddress(tracery_ops_f3 as Unary)
  static let f4 = entryAddress(tracery_ops_f4 as Unary)
  static let replacement = entryAddress(tracery_ops_replacement as Unary)
  static let all = [f1, f2, f3, f4]

  typealias CCallback = @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void
  static let count = unsafeBitCast(tracery_ops_count as CCallback, to: OpsCallback.self)
  static let add1000 = unsafeBitCast(tracery_ops_add_1000 as CCallback, to: OpsCallback.self)
  static let redirect = unsafeBitCast(tracery_ops_redirect as CCallback, to: OpsCallback.self)

  /// Calls each function once; checks the results.
  static func callAll() {
    #expect(tracery_ops_f1(10) == 11)
    #expect(tracery_ops_f2(10) == 12)
    #expect(tracery_ops_f3(10) == 13)
    #expect(tracery_ops_f4(10) == 14)
  }

  /// Which functions (by index in `all`) ops `cookie` saw, after `callAll`.
  static func seen(by cookie: UInt64) -> [Int] {
    all.indices.filter { tracery_ops_calls(cookie, all[$0]) > 0 }
  }
}

extension PatchingTests {
  @Suite(.serialized) struct OpsTests {
    let tracer = Tracer()

    /// The shared callers live now.
    var shared: Set<UInt64> { tracer.state.withLock { Set($0.opsSharedImages.map(\.entry)) } }

    @Test(arguments: [true, false])
    func twoOpsOnOverlappingSets(detachFirstAttachedFirst: Bool) throws {
      let a = try tracer.attachOps(
        OpsFixture.count, to: .addresses([OpsFixture.f1, OpsFixture.f2, OpsFixture.f3]), cookie: 1)
      // B: f2, f3, f4 — given as all four minus f1 (notrace).
      let b = try tracer.attachOps(
        OpsFixture.count, to: .addresses(OpsFixture.all), except: .address(OpsFixture.f1), cookie: 2)
      tracery_ops_reset()
      OpsFixture.callAll()
      #expect(OpsFixture.seen(by: 1) == [0, 1, 2])
      #expect(OpsFixture.seen(by: 2) == [1, 2, 3])
      // f1 and f4 call their ops' own trampolines; f2 and f3 the shared caller.
      #expect(a.ownTrampolines.contains(siteTarget(OpsFixture.f1) ?? 0))
      #expect(b.ownTrampolines.contains(siteTarget(OpsFixture.f4) ?? 0))
      #expect(shared.contains(siteTarget(OpsFixture.f2) ?? 0) && shared.contains(siteTarget(OpsFixture.f3) ?? 0))

      let (gone, kept, keptCookie, keptFunctions) =
        detachFirstAttachedFirst ? (a, b, UInt64(2), [1, 2, 3]) : (b, a, UInt64(1), [0, 1, 2])
      gone.detach()
      tracery_ops_reset()
      OpsFixture.callAll()
      #expect(OpsFixture.seen(by: keptCookie) == keptFunctions)
      #expect(OpsFixture.seen(by: 3 - keptCookie) == [])
      // Every site of the remaining ops is back on its own trampoline; the others are untouched.
      for index in keptFunctions { #expect(kept.ownTrampolines.contains(siteTarget(OpsFixture.all[index]) ?? 0)) }
      for index in Set(0..<4).subtracting(keptFunctions) { #expect(siteTarget(OpsFixture.all[index]) == nil) }
      #expect(shared.isEmpty)
      kept.detach()
      for site in OpsFixture.all { #expect(siteTarget(site) == nil) }
    }

    @Test func sitesMoveBetweenStatesInOneBatch() throws {
      let a = try tracer.attachOps(OpsFixture.count, to: .addresses([OpsFixture.f1, OpsFixture.f2]), cookie: 1)
      var b: OpsLink?
      // One transaction: A leaves, B arrives on f2 and f3. f1 goes back to its bytes, f2 moves
      // from A's trampoline to B's, f3 starts on B's.
      try tracer.transaction { transaction throws(AttachError) in
        transaction.detach(a)
        b = try transaction.attachOps(OpsFixture.count, to: .addresses([OpsFixture.f2, OpsFixture.f3]), cookie: 2)
      }
      let link = try #require(b)
      defer { link.detach() }
      #expect(siteTarget(OpsFixture.f1) == nil)
      #expect(link.ownTrampolines.contains(siteTarget(OpsFixture.f2) ?? 0))
      #expect(link.ownTrampolines.contains(siteTarget(OpsFixture.f3) ?? 0))
      tracery_ops_reset()
      OpsFixture.callAll()
      #expect(OpsFixture.seen(by: 1) == [] && OpsFixture.seen(by: 2) == [1, 2])
    }

    @Test func anOpsAloneIsCalledFromItsOwnTrampoline() throws {
      let ops = try tracer.attachOps(OpsFixture.count, to: .address(OpsFixture.f1), cookie: 1)
      defer { ops.detach() }
      tracery_ops_reset()
      #expect(tracery_ops_f1(1) == 2)
      // The callback's caller is the ops' own trampoline itself: no shared caller on the path.
      let own = try #require(ops.ownTrampolines.first)
      let caller = tracery_ops_last_caller()
      #expect(caller > own && caller < own + 512)
      // Forced through the shared caller, it is called from the dispatcher instead.
      let forced = try tracer.attachOps(OpsFixture.count, to: .address(OpsFixture.f2), cookie: 2, flags: .alwaysShared)
      defer { forced.detach() }
      tracery_ops_reset()
      #expect(tracery_ops_f2(1) == 3)
      #expect(tracery_ops_calls(2, OpsFixture.f2) == 1)
      #expect(shared.contains(siteTarget(OpsFixture.f2) ?? 0))
      let sharedCaller = tracery_ops_last_caller()
      #expect(!(sharedCaller > own && sharedCaller < own + 512))
      #expect(forced.ownTrampolines.isEmpty)
    }

    @Test func callbacksChangeArgumentsAndWhereTheCallGoes() throws {
      let add = try tracer.attachOps(OpsFixture.add1000, to: .address(OpsFixture.f1))
      #expect(tracery_ops_f1(1) == 1002)
      add.detach()
      #expect(tracery_ops_f1(1) == 2)
      let redirect = try tracer.attachOps(OpsFixture.redirect, to: .address(OpsFixture.f3))
      #expect(tracery_ops_f3(7) == 700)
      redirect.detach()
      #expect(tracery_ops_f3(7) == 10)
    }

    @Test func opsAndAPerFunctionTrampolineBothRun() throws {
      let ops = try tracer.attachOps(OpsFixture.count, to: .addresses([OpsFixture.f2, OpsFixture.f4]), cookie: 3)
      let entry = try tracer.attach(.entry(OpsFixture.add1000), to: .address(OpsFixture.f2))
      tracery_ops_reset()
      // The ops sees the call (before the entry handler), and the entry handler changes it.
      #expect(tracery_ops_f2(1) == 1003)
      #expect(tracery_ops_f4(1) == 5)
      #expect(tracery_ops_calls(3, OpsFixture.f2) == 1 && tracery_ops_calls(3, OpsFixture.f4) == 1)
      #expect(tracer.liveTrampolines.contains(siteTarget(OpsFixture.f2) ?? 0))
      entry.detach()
      // Back to the ops' own trampoline.
      #expect(ops.ownTrampolines.contains(siteTarget(OpsFixture.f2) ?? 0))
      #expect(tracery_ops_f2(1) == 3)
      ops.detach()
      #expect(siteTarget(OpsFixture.f2) == nil && siteTarget(OpsFixture.f4) == nil)
    }

    @Test func opsMultiAndAGraphUserShareAFunction() throws {
      let ops = try tracer.attachOps(OpsFixture.count, to: .address(OpsFixture.f1), cookie: 1)
      let multi = try tracer.attachMulti(
        MultiFixture.entry, to: .address(OpsFixture.f1), cookie: { $0 << 4 | 6 }, strategy: .global(.automatic))
      let graph = try GraphFixture.attachRecording(tracer, to: .address(OpsFixture.f1), cookie: 2)
      tracery_ops_reset()
      tracery_multi_reset()
      tracery_graph_events_reset()
      // The graph stub calls the function's per-function trampoline (ops, then multi handlers).
      #expect(tracery_ops_f1(3) == 4)
      #expect(tracery_ops_calls(1, OpsFixture.f1) == 1)
      #expect(tracery_multi_ok(6) == 1)
      #expect(GraphFixture.events.map(\.kind) == [1, 2])
      #expect(GraphFixture.events.last?.return_value == 4)
      graph.detach()
      // Without the graph user, the ops and the multi handler still share the trampoline.
      #expect(tracery_ops_f1(3) == 4)
      #expect(tracery_ops_calls(1, OpsFixture.f1) == 2 && tracery_multi_ok(6) == 2)
      multi.detach()
      // The ops alone: back to its own trampoline.
      #expect(ops.ownTrampolines.contains(siteTarget(OpsFixture.f1) ?? 0))
      ops.detach()
      #expect(siteTarget(OpsFixture.f1) == nil)
    }
  }
}
