import Foundation
import Synchronization
import Testing
import TraceryFixtures
import TraceryTestSupport

@testable import TraceryCore

enum FprobeFixture {
  typealias Unary = @convention(c) (Int) -> Int
  static let hooked = entryAddress(tracery_fprobe_with_hook as Unary)

  typealias CEntry =
    @convention(c) (UInt64, UnsafeMutablePointer<tracery_call>?, UnsafeMutablePointer<UInt64>?, UInt64)
    -> Int32
  typealias CExit =
    @convention(c) (UInt64, UnsafeMutablePointer<tracery_call>?, UnsafeMutablePointer<UInt64>?, UInt64)
    -> Void
  static let entry = unsafeBitCast(tracery_fprobe_entry as CEntry, to: FprobeEntryHandler.self)
  static let exit = unsafeBitCast(tracery_fprobe_exit as CExit, to: FprobeExitHandler.self)

  /// What the hook does while a call of `tracery_fprobe_with_hook` is in flight.
  nonisolated(unsafe) static var inFlight: () -> Void = {}
}

extension PatchingTests {
  @Suite(.serialized) struct FprobeTests {
    let tracer = Tracer()

    @Test func entryAndExitSeeTheirOwnDataAndEntryOnlyProbesPushNoFrame() throws {
      tracery_fprobe_reset()
      let both = try tracer.registerFprobe(
        entry: FprobeFixture.entry, exit: FprobeFixture.exit, to: .address(OpsFixture.f1), cookie: 1)
      let second = try tracer.registerFprobe(
        entry: FprobeFixture.entry, exit: FprobeFixture.exit, to: .address(OpsFixture.f1), cookie: 2)
      let entryOnly = try tracer.registerFprobe(
        entry: FprobeFixture.entry, exit: nil, to: .addresses([OpsFixture.f1, OpsFixture.f2]), cookie: 3)
      #expect(tracery_ops_f1(5) == 6)
      #expect(tracery_ops_f2(5) == 7)
      #expect(tracery_fprobe_entries(1) == 1 && tracery_fprobe_exits(1) == 1)
      #expect(tracery_fprobe_last_data(1) == 51 && tracery_fprobe_last_return(1) == 6)
      #expect(tracery_fprobe_last_data(2) == 52 && tracery_fprobe_exits(2) == 1)
      #expect(tracery_fprobe_entries(3) == 2 && tracery_fprobe_exits(3) == 0)
      // f2 has only an entry-only probe: a plain ops, no graph stub (no shadow frame).
      let graphStubs = tracer.state.withLock { state in
        Set(state.functions.values.compactMap(\.graphStub?.block.address))
      }
      #expect(graphStubs.contains(siteTarget(OpsFixture.f1) ?? 0))
      #expect(!graphStubs.contains(siteTarget(OpsFixture.f2) ?? 0) && siteTarget(OpsFixture.f2) != nil)
      both.unregister()
      second.unregister()
      // f1 moves from the graph to the ops in the same batch; f2 stays.
      #expect(tracery_ops_f1(5) == 6)
      #expect(tracery_fprobe_entries(3) == 3 && tracery_fprobe_entries(1) == 1)
      #expect(!graphStubs.contains(siteTarget(OpsFixture.f1) ?? 0))
      entryOnly.unregister()
      #expect(siteTarget(OpsFixture.f1) == nil && siteTarget(OpsFixture.f2) == nil)
    }

    @Test func aProbeUnregisteredDuringACallGetsNoExitAndItsSlotsNextProbeIsNotConfused() throws {
      tracery_fprobe_reset()
      let first = try tracer.registerFprobe(
        entry: FprobeFixture.entry, exit: FprobeFixture.exit, to: .address(FprobeFixture.hooked), cookie: 4)
      // Keep the function in the graph throughout, so the in-flight call keeps its frame.
      let witness = try tracer.registerFprobe(
        entry: nil, exit: FprobeFixture.exit, to: .address(FprobeFixture.hooked), cookie: 6)
      defer { witness.unregister() }
      nonisolated(unsafe) var next: Fprobe?
      let tracer = self.tracer
      FprobeFixture.inFlight = {
        first.unregister()
        // Very likely the freed slot: a new generation in the same memory.
        next = try? tracer.registerFprobe(
          entry: FprobeFixture.entry, exit: FprobeFixture.exit, to: .address(FprobeFixture.hooked), cookie: 5)
      }
      tracery_fprobe_set_hook { FprobeFixture.inFlight() }
      #expect(tracery_fprobe_with_hook(1) == 2)
      tracery_fprobe_set_hook(nil)
      #expect(tracery_fprobe_entries(4) == 1 && tracery_fprobe_exits(4) == 0)
      #expect(tracery_fprobe_entries(5) == 0 && tracery_fprobe_exits(5) == 0)
      #expect(tracery_fprobe_exits(6) == 1)
      // The new probe works for the next call.
      #expect(tracery_fprobe_with_hook(2) == 3)
      #expect(tracery_fprobe_entries(5) == 1 && tracery_fprobe_exits(5) == 1)
      next?.unregister()
    }

    @Test func aProbeThatCannotAttachLeavesNothingBehind() throws {
      // Every graph user slot taken: a probe with an exit cannot get the fprobe graph user.
      let users = try (0..<16).map { _ in
        try tracer.attachGraph(.handlers(entry: nil, exit: nil), to: .address(GraphFixture.leaf))
      }
      #expect(throws: AttachError.graphUsersExhausted) {
        try tracer.registerFprobe(entry: FprobeFixture.entry, exit: FprobeFixture.exit, to: .address(OpsFixture.f3))
      }
      #expect(siteTarget(OpsFixture.f3) == nil)
      for user in users { user.detach() }
      tracery_fprobe_reset()
      let probe = try tracer.registerFprobe(
        entry: FprobeFixture.entry, exit: FprobeFixture.exit, to: .address(OpsFixture.f3), cookie: 7)
      #expect(tracery_ops_f3(1) == 4)
      #expect(tracery_fprobe_entries(7) == 1 && tracery_fprobe_exits(7) == 1)
      probe.unregister()
      #expect(siteTarget(OpsFixture.f3) == nil)
    }

    @Test func registerAndUnregisterStormsWhileThreadsCall() throws {
      tracery_fprobe_reset()
      let rounds = TestSupport.stormIterations(default: 30, long: 1000)
      let stop = Atomic<Bool>(false)
      let wrong = Atomic<Int>(0)
      let calls = Atomic<Int>(0)
      let callers = (0..<2).map { _ in
        Thread {
          while !stop.load(ordering: .relaxed) {
            // Every call returns its own result, whatever probe comes or goes around it.
            if tracery_ops_f3(1) != 4 || tracery_ops_f4(2) != 6 { wrong.add(1, ordering: .relaxed) }
            calls.add(1, ordering: .relaxed)
          }
        }
      }
      for caller in callers { caller.start() }
      for _ in 0..<rounds {
        let probes = try (0..<3).map { index in
          try tracer.registerFprobe(
            entry: FprobeFixture.entry, exit: index == 2 ? nil : FprobeFixture.exit,
            to: .addresses(index == 1 ? [OpsFixture.f3] : [OpsFixture.f3, OpsFixture.f4]), cookie: UInt64(index))
        }
        for probe in probes.shuffled() { probe.unregister() }
      }
      stop.store(true, ordering: .relaxed)
      while callers.contains(where: { !$0.isFinished }) { usleep(1000) }
      #expect(siteTarget(OpsFixture.f3) == nil && siteTarget(OpsFixture.f4) == nil)
      for cookie in UInt64(0)...1 { #expect(tracery_fprobe_exits(cookie) <= tracery_fprobe_entries(cookie)) }
      #expect(wrong.load(ordering: .relaxed) == 0, "of \(calls.load(ordering: .relaxed)) calls")
      #expect(calls.load(ordering: .relaxed) > 0)
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
    }
  }
}
