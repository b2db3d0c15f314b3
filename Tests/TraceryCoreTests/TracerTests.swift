import Foundation
import Testing
import TraceryCxxFixtures
import TraceryFixtures

@testable import TraceryCore

func address(_ pointer: UnsafeRawPointer) -> UInt64 { UInt64(UInt(bitPattern: pointer)) }

/// Entry addresses of the fixtures (C function pointers are their entry addresses).
enum Fixture {
  static let six = address(
    unsafeBitCast(
      tracery_fixture_six as @convention(c) (Int, Int, Int, Int, Int, Int) -> Int, to: UnsafeRawPointer.self))
  static let floats = address(
    unsafeBitCast(
      tracery_fixture_floats as @convention(c) (Double, Double, Int, Double) -> Double, to: UnsafeRawPointer.self))
  static let eight = address(
    unsafeBitCast(
      tracery_fixture_eight as @convention(c) (Int, Int, Int, Int, Int, Int, Int, Int) -> Int, to: UnsafeRawPointer.self
    ))
  static let pair = address(
    unsafeBitCast(tracery_fixture_pair as @convention(c) (Int, Int) -> tracery_pair, to: UnsafeRawPointer.self))
  static let double = address(
    unsafeBitCast(tracery_fixture_double as @convention(c) (Int) -> Double, to: UnsafeRawPointer.self))
  static let block = address(
    unsafeBitCast(tracery_fixture_block as @convention(c) (Int) -> Int, to: UnsafeRawPointer.self))
  static let backtraceDepth = address(
    unsafeBitCast(tracery_fixture_backtrace_depth as @convention(c) (Int) -> Int, to: UnsafeRawPointer.self))
  static let callsAdd = address(
    unsafeBitCast(tracery_fixture_calls_add as @convention(c) (Int) -> Int, to: UnsafeRawPointer.self))
  static let thrower = address(tracery_cxx_thrower_address()!)
  /// Swift cannot form a pointer to a C variadic function: C hands it over.
  static let varargs = address(tracery_fixture_varargs_address()!)
}

/// C handlers from the fixtures, typed as Tracery's handler types.
enum Handlers {
  static let entry = unsafeBitCast(
    tracery_fixture_entry_record as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
    to: EntryHandler.self)
  static let exit = unsafeBitCast(
    tracery_fixture_exit_record as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
    to: ExitHandler.self)
  static let modify = unsafeBitCast(
    tracery_fixture_modify_record as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Int32,
    to: ModifyReturnHandler.self)
  static let setArg0 = unsafeBitCast(
    tracery_fixture_entry_set_arg0 as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
    to: EntryHandler.self)
  static let clobber = unsafeBitCast(
    tracery_fixture_entry_clobber as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
    to: EntryHandler.self)
  static let backtrace = unsafeBitCast(
    tracery_fixture_entry_backtrace as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
    to: EntryHandler.self)
  static let reenter = unsafeBitCast(
    tracery_fixture_entry_reenter as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
    to: EntryHandler.self)
}

func records() -> [tracery_fixture_record] {
  (0..<tracery_fixture_records_count()).map { tracery_fixture_record_at($0) }
}

func argumentWords(_ record: tracery_fixture_record) -> [UInt64] {
  withUnsafeBytes(of: record.arguments) { Array($0.bindMemory(to: UInt64.self)) }
}

func floatWords(_ record: tracery_fixture_record) -> [Double] {
  withUnsafeBytes(of: record.float_arguments) { Array($0.bindMemory(to: Double.self)) }
}

extension PatchingTests {
  /// Every test here attaches through `Tracer.shared` and reads the shared fixture records.
  @Suite(.serialized) struct TracerTests {
    let tracer = Tracer.shared

    init() { tracery_fixture_records_reset() }

    @Test func sixIntegerArgumentsSeenAndReturned() throws {
      let model = FunctionModel(integerArguments: 6)
      let entry = try tracer.attach(.entry(Handlers.entry), to: .address(Fixture.six), cookie: 11, model: model)
      let exit = try tracer.attach(.exit(Handlers.exit), to: .address(Fixture.six), cookie: 12, model: model)
      defer {
        entry.detach()
        exit.detach()
      }
      #expect(tracery_fixture_six(1, 2, 3, 4, 5, 6) == 123456)
      let seen = records()
      #expect(seen.map(\.kind) == [1, 2])
      #expect(seen.map(\.cookie) == [11, 12])
      #expect(seen.allSatisfy { $0.function == Fixture.six })
      #expect(argumentWords(seen[0]) == [1, 2, 3, 4, 5, 6])
      #expect(seen[1].return_value.0 == 123456)
      #expect(entry.functions == [Fixture.six])
    }

    @Test func entryHandlerChangesAnArgument() throws {
      let link = try tracer.attach(.entry(Handlers.setArg0), to: .address(Fixture.six), cookie: 9)
      defer { link.detach() }
      #expect(tracery_fixture_six(1, 2, 3, 4, 5, 6) == 923456)
    }

    @Test func floatArgumentsAndDoubleReturnSurviveAClobberingHandler() throws {
      let model = FunctionModel(integerArguments: 1, floatArguments: 3, returns: .double)
      let clobber = try tracer.attach(.entry(Handlers.clobber), to: .address(Fixture.floats), model: model)
      let entry = try tracer.attach(.entry(Handlers.entry), to: .address(Fixture.floats))
      let exit = try tracer.attach(.exit(Handlers.exit), to: .address(Fixture.floats))
      defer { _ = [clobber, entry, exit].map { $0.detach() } }
      let result = tracery_fixture_floats(1.5, 2.5, 3, 4.0)
      #expect(abs(result - 178.4) < 1e-9)
      let seen = records()
      #expect(Array(floatWords(seen[0]).prefix(3)) == [1.5, 2.5, 4.0])
      #expect(abs(seen[1].float_return - 178.4) < 1e-9)
    }

    @Test func varargsKeepAl() throws {
      let model = FunctionModel(integerArguments: 6, floatArguments: 8, returns: .integer, isVariadic: true)
      let clobber = try tracer.attach(.entry(Handlers.clobber), to: .address(Fixture.varargs), model: model)
      let exit = try tracer.attach(.exit(Handlers.exit), to: .address(Fixture.varargs))
      defer { _ = [clobber, exit].map { $0.detach() } }
      #expect(tracery_fixture_varargs_call() == 75)
      #expect(records().last?.return_value.0 == 75)
    }

    @Test func stackArgumentsAreCopiedForTheOriginal() throws {
      let model = FunctionModel(integerArguments: 6, stackArgumentWords: 2)
      let entry = try tracer.attach(.entry(Handlers.entry), to: .address(Fixture.eight), model: model)
      let exit = try tracer.attach(.exit(Handlers.exit), to: .address(Fixture.eight))
      defer { _ = [entry, exit].map { $0.detach() } }
      #expect(tracery_fixture_eight(1, 2, 3, 4, 5, 6, 7, 8) == 204)
      let seen = records()
      #expect(seen[0].stack_arguments.0 == 7 && seen[0].stack_arguments.1 == 8)
      #expect(seen[1].return_value.0 == 204)
    }

    @Test func structReturnInRaxRdxAndDoubleReturn() throws {
      let pair = try tracer.attach(
        .exit(Handlers.exit), to: .address(Fixture.pair),
        model: FunctionModel(integerArguments: 2, returns: .integerPair)
      )
      let double = try tracer.attach(
        .exit(Handlers.exit), to: .address(Fixture.double), model: FunctionModel(integerArguments: 1, returns: .double))
      defer { _ = [pair, double].map { $0.detach() } }
      let result = tracery_fixture_pair(10, 3)
      #expect(result.low == 13 && result.high == 7)
      #expect(tracery_fixture_double(10) == 2.5)
      let seen = records()
      #expect(seen[0].return_value.0 == 13 && seen[0].return_value.1 == 7)
      #expect(seen[1].float_return == 2.5)
    }

    @Test func modifyReturnSkipsTheBodyAndRunsBeforeExit() throws {
      let model = FunctionModel(integerArguments: 6)
      let exit = try tracer.attach(.exit(Handlers.exit), to: .address(Fixture.six), cookie: 1, model: model)
      let entry = try tracer.attach(.entry(Handlers.entry), to: .address(Fixture.six), cookie: 2)
      let modify = try tracer.attach(.modifyReturn(Handlers.modify), to: .address(Fixture.six), cookie: 99)
      #expect(tracery_fixture_six(1, 2, 3, 4, 5, 6) == 99)
      #expect(records().map(\.kind) == [1, 3, 2])
      #expect(records().last?.return_value.0 == 99)
      modify.detach()
      let passThrough = try tracer.attach(.modifyReturn(Handlers.modify), to: .address(Fixture.six), cookie: 0)
      #expect(tracery_fixture_six(1, 2, 3, 4, 5, 6) == 123456)
      _ = [exit, entry, passThrough].map { $0.detach() }
      tracery_fixture_records_reset()
      #expect(tracery_fixture_six(1, 2, 3, 4, 5, 6) == 123456)
      #expect(records().isEmpty)
    }

    @Test func handlersRunInAttachOrderAndDetachingOneLeavesTheOthers() throws {
      let links = try (1...3).map {
        try tracer.attach(.entry(Handlers.entry), to: .address(Fixture.double), cookie: UInt64($0))
      }
      _ = tracery_fixture_double(1)
      #expect(records().map(\.cookie) == [1, 2, 3])
      links[1].detach()
      links[1].detach()  // twice is harmless
      tracery_fixture_records_reset()
      _ = tracery_fixture_double(1)
      #expect(records().map(\.cookie) == [1, 3])
      #expect(links[1].functions.isEmpty && links[0].functions == [Fixture.double])
      links[0].detach()
      links[2].detach()
    }

    @Test func recursionGuardSkipsHandlersInsideHandlers() throws {
      let reenter = try tracer.attach(.entry(Handlers.reenter), to: .address(Fixture.six), statistics: .calls)
      let inner = try tracer.attach(.entry(Handlers.entry), to: .address(Fixture.double), statistics: .calls)
      defer { _ = [reenter, inner].map { $0.detach() } }
      #expect(tracery_fixture_six(0, 0, 0, 0, 0, 1) == 1)
      #expect(reenter.calls == 1)
      #expect(inner.calls == 0 && inner.skippedByRecursionGuard == 1)
      #expect(records().isEmpty)
      _ = tracery_fixture_double(2)
      #expect(inner.calls == 1 && records().count == 1)
      #expect(Tracer.recursionGuardIsSet == false)
    }

    /// The README's example, as written there (with a fixture's name for the glob).
    @Test func readmeExample() throws {
      // A handler is a @convention(c) function: written in C (see tracery.h) or in Swift.
      let onEntry: EntryHandler = { call, cookie in
        // call.pointee.arguments.0 is rdi; handlers may change arguments before the body runs.
        let counters = UnsafeMutablePointer<Int>(bitPattern: UInt(cookie))!  // state through the cookie
        counters.pointee += 1
      }
      let counts = UnsafeMutablePointer<Int>.allocate(capacity: 1)
      counts.initialize(to: 0)
      defer { counts.deallocate() }

      let link = try Tracer.shared.attach(
        .entry(onEntry), to: .glob("tracery_fixture_doub*"), cookie: UInt64(UInt(bitPattern: counts)))
      _ = tracery_fixture_double(1)
      _ = tracery_fixture_double(2)
      link.detach()
      _ = tracery_fixture_double(3)
      #expect(counts.pointee == 2)
    }

    @Test func handlerTimeIsMeasuredWhenAsked() throws {
      let slow: EntryHandler = { _, _ in usleep(2000) }
      let timed = try tracer.attach(.entry(slow), to: .address(Fixture.double), statistics: .callsAndTime)
      let modify = try tracer.attach(
        .modifyReturn(Handlers.modify), to: .address(Fixture.six), cookie: 5, model: FunctionModel(integerArguments: 6),
        statistics: .callsAndTime)
      defer { _ = [timed, modify].map { $0.detach() } }
      for _ in 0..<5 { _ = tracery_fixture_double(4) }
      #expect(timed.calls == 5)
      #expect(timed.handlerTime >= .milliseconds(10) && timed.handlerTime < .seconds(5), "\(timed.handlerTime)")
      // A timed modify-return handler's result still decides.
      #expect(tracery_fixture_six(1, 2, 3, 4, 5, 6) == 5)
      #expect(modify.calls == 1)
    }

    @Test func cxxExceptionUnwindsThroughAnExitTrampoline() throws {
      let link = try tracer.attach(
        .exit(Handlers.exit), to: .address(Fixture.thrower), model: FunctionModel(integerArguments: 1))
      defer { link.detach() }
      #expect(tracery_cxx_catch(5) == 5)
      #expect(tracery_cxx_catch(0) == 1007)
      #expect(records().count == 1)
      #expect(tracery_cxx_catch(6) == 6)
    }

    @Test func backtraceSeesCallersThroughAnExitTrampoline() throws {
      let untraced = tracery_fixture_backtrace_depth(0)
      let link = try tracer.attach(
        .exit(Handlers.exit), to: .address(Fixture.backtraceDepth), model: FunctionModel(integerArguments: 1))
      defer { link.detach() }
      let traced = tracery_fixture_backtrace_depth(0)
      #expect(untraced >= 4)
      #expect(traced == untraced + 1, "untraced \(untraced) frames, traced \(traced)")
    }

    /// Unwinding through an entry-only trampoline (no frame pointer): a handler's backtrace sees
    /// the handler, the trampoline, and then the traced function's callers.
    @Test func backtraceFromAnEntryHandler() throws {
      let untraced = tracery_fixture_backtrace_depth(0)
      let link = try tracer.attach(.entry(Handlers.backtrace), to: .address(Fixture.backtraceDepth))
      defer { link.detach() }
      _ = tracery_fixture_backtrace_depth(0)
      #expect(Int(tracery_fixture_handler_depth()) == untraced + 1)
    }

    @Test func blockedThreadSurvivesReplacementAndItsImageIsReclaimedAfter() throws {
      _ = tracer.reclaim()
      let model = FunctionModel(integerArguments: 1)
      let first = try tracer.attach(.exit(Handlers.exit), to: .address(Fixture.block), cookie: 1, model: model)
      // The reclaimer scans stacks conservatively, this one included: trampoline addresses are
      // kept on the heap here, never in a local of this frame.
      let oldImage = AddressBox(tracer.liveTrampolines)
      let result = ResultBox()
      let thread = Thread { result.set(tracery_fixture_block(41)) }
      thread.start()
      while tracery_fixture_blocked() == 0 { usleep(1000) }
      // Replace the trampoline (second attachment) and detach the first, while the thread waits
      // inside the original, called from the old image.
      let second = try tracer.attach(.exit(Handlers.exit), to: .address(Fixture.block), cookie: 2, model: model)
      first.detach()
      #expect(oldImage.isDisjoint(with: tracer.liveTrampolines))
      #expect(tracer.retiredTrampolines >= 1)
      _ = tracer.reclaim()
      #expect(tracer.retiredTrampolines >= 1, "the old image must wait for the blocked thread")
      tracery_fixture_release()
      while result.value == nil { usleep(1000) }
      #expect(result.value == 42)
      // The old image ran the first attachment's exit handler on the way out.
      #expect(records().map(\.cookie) == [1])
      // Once the thread has left, the old image can be freed. Reclaiming is eventual (a thread of
      // another test may be running inside an image, or be slow to answer): retry, boundedly.
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
      second.detach()
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
    }

    /// A running thread that blocks the snapshot signal cannot be inspected: retired trampolines
    /// stay allocated (and the reason is reported) until it can be.
    @Test func uninspectableThreadKeepsRetiredTrampolines() throws {
      #expect(tracer.reclaimAll())
      tracery_fixture_spinner_start()
      let link = try tracer.attach(.entry(Handlers.entry), to: .address(Fixture.double))
      link.detach()
      #expect(tracer.retiredTrampolines == 1)
      #expect(tracer.reclaim() == 0)
      #expect(tracer.retiredTrampolines == 1)
      #expect(tracer.reclaimObstacle?.contains("did not answer") == true, "\(tracer.reclaimObstacle ?? "none")")
      tracery_fixture_spinner_stop()
      #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
      #expect(tracer.reclaimObstacle == nil)
    }

    /// An address a running thread holds only in a register keeps its block busy: a global
    /// multi-attach trampoline holds a record that way between its load and its hazard store.
    @Test func anAddressHeldInARegisterIsBusy() throws {
      let arena = CodeArena()
      let block = try arena.allocate(near: Fixture.double, size: 64)
      defer { arena.release(block) }
      // The range checked is 8 bytes into the block; this frame (which the scan of this thread
      // covers) holds no address in it, not even a temporary: only the block's start, masked.
      let key: UInt64 = 0x5a5a_5a5a_5a5a_5a5a
      let masked = block.address ^ key
      func scan() -> Result<[Int: Reclaimer.Holder], Reclaimer.Obstacle> {
        withCallerStackMarker { marker in
          let start = (masked ^ key) + 8
          return Reclaimer.busyRanges([start..<(start + 8)], callerStack: marker)
        }
      }
      #expect(scan().isBusy == false)
      tracery_fixture_holder_start(masked)
      let held = scan()
      tracery_fixture_holder_stop()
      let released = scan()
      guard case .success(let busy) = held, case .success(let free) = released else {
        Issue.record("a thread could not be inspected: \(held) \(released)")
        return
      }
      #expect(busy.keys.sorted() == [0] && busy[0]?.place == .register && free.isEmpty, "\(busy)")
    }

    @Test func typedErrors() throws {
      #expect(throws: AttachError.self) {
        try tracer.attach(.exit(Handlers.exit), to: .address(Fixture.pair))  // unknown stack arguments
      }
      do {
        try tracer.attach(.exit(Handlers.exit), to: .address(Fixture.double), model: .unknown)
        Issue.record("attached an exit handler without knowing the stack arguments")
      } catch {
        guard case .nothingAttached(let report) = error else { throw error }
        #expect(report.description.contains("pass a FunctionModel with stackArgumentWords"))
      }
      do {
        try tracer.attach(.entry(Handlers.entry), to: .address(Fixture.six + 1))
        Issue.record("attached to the middle of an instruction")
      } catch {
        guard case .noPatchSite(let function, let reason) = error else { throw error }
        #expect(function == "0x\(String(Fixture.six + 1, radix: 16))")
        #expect(reason.contains("not a 5-byte NOP"))
      }
      #expect(throws: AttachError.noFunctionMatches("'tracery_no_such_function_*'")) {
        try tracer.attach(.entry(Handlers.entry), to: .glob("tracery_no_such_function_*"))
      }
      #expect(throws: AttachError.invalidPattern("glob 'a[': '[' without a closing ']'")) {
        try tracer.attach(.entry(Handlers.entry), to: .glob("a["))
      }
      #expect(tracery_fixture_double(4) == 1.0)
    }

    @Test func namesGlobsAndTransactions() throws {
      let byName = try tracer.attach(.entry(Handlers.entry), to: .name("tracery_fixture_double"), cookie: 5)
      #expect(byName.functions == [Fixture.double])
      byName.detach()
      var links: [Link] = []
      let report = try tracer.transaction { (transaction: inout Tracer.Transaction) throws(AttachError) in
        links.append(try transaction.attach(.entry(Handlers.entry), to: .glob("tracery_fixture_[dp]*"), cookie: 6))
        links.append(try transaction.attach(.entry(Handlers.entry), to: .address(Fixture.six), cookie: 7))
      }
      #expect(report.failures.isEmpty, "\(report)")
      #expect(Set(report.entries.map(\.function)).isSuperset(of: ["tracery_fixture_double", "tracery_fixture_pair"]))
      _ = tracery_fixture_double(1)
      _ = tracery_fixture_six(0, 0, 0, 0, 0, 0)
      #expect(records().map(\.cookie) == [6, 7])
      let undo = try tracer.transaction { (transaction: inout Tracer.Transaction) throws(AttachError) in
        for link in links { transaction.detach(link) }
      }
      #expect(undo.failures.isEmpty)
      #expect(links.allSatisfy { $0.functions.isEmpty })
      tracery_fixture_records_reset()
      _ = tracery_fixture_double(1)
      #expect(records().isEmpty)
    }
  }

}

final class ResultBox: @unchecked Sendable {
  // @unchecked: every access goes through `lock`.
  private let lock = NSLock()
  private var stored: Int?
  func set(_ value: Int) {
    lock.lock()
    stored = value
    lock.unlock()
  }
  var value: Int? {
    lock.lock()
    defer { lock.unlock() }
    return stored
  }
}

/// Holds trampoline addresses scrambled, so that a conservative stack scan never mistakes a
/// test's own bookkeeping for a thread inside a trampoline.
extension Tracer {
  /// Reclaims until nothing is retired and no multi-attach padding waits for its NOPs, for at
  /// most 5 seconds (a thread of another test may be running inside an image, or be slow to
  /// answer).
  func reclaimAll() -> Bool {
    for _ in 0..<500 {
      reclaim()
      if retiredTrampolines == 0 && state.withLock({ $0.multi.pendingNops.isEmpty }) { return true }
      usleep(10000)
    }
    return false
  }

  /// What is retired and what stops reclaiming, for failure messages.
  var reclaimState: String { "retired: \(retiredTrampolines), obstacle: \(reclaimObstacle ?? "none")" }
}

final class AddressBox: @unchecked Sendable {
  // @unchecked: immutable after init.
  private let scrambled: [UInt64]
  init(_ addresses: [UInt64]) { scrambled = addresses.map { ~$0 } }
  func isDisjoint(with addresses: [UInt64]) -> Bool { Set(scrambled.map { ~$0 }).isDisjoint(with: addresses) }
  /// For each address held, whether `addresses` contains it.
  func contained(in addresses: [UInt64]) -> [Bool] {
    let set = Set(addresses)
    return scrambled.map { set.contains(~$0) }
  }
}

extension Result<[Int: Reclaimer.Holder], Reclaimer.Obstacle> {
  /// nil when the scan could not inspect every thread.
  fileprivate var isBusy: Bool? { if case .success(let busy) = self { !busy.isEmpty } else { nil } }
}
