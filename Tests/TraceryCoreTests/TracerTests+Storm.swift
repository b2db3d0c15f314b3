import Foundation
import Testing
import TraceryFixtures
import TraceryTestSupport

@testable import TraceryCore

extension PatchingTests.TracerTests {
  /// Two threads call three traced functions and check every result while this thread
  /// attaches, replaces and detaches entry, exit and modify-return trampolines on them (each
  /// change one batch), and the reclaimer frees what it can as it goes. At the end every image
  /// is freed and every site is as it was.
  @Test func attachDetachStormWhileThreadsCall() throws {
    let rounds = TestSupport.stormIterations(default: 2_000, long: 40_000)
    let functions = [Fixture.six, Fixture.floats, Fixture.pair]
    let before = functions.map { TextPatcher.read($0) }
    let models = [
      FunctionModel(integerArguments: 6), FunctionModel(integerArguments: 1, floatArguments: 3, returns: .double),
      FunctionModel(integerArguments: 2, returns: .integerPair),
    ]
    let empty = unsafeBitCast(
      tracery_fixture_empty_handler as @convention(c) (UnsafeMutablePointer<tracery_call>?, UInt64) -> Void,
      to: EntryHandler.self)
    let passThrough: ModifyReturnHandler = { _, _ in 0 }
    tracery_fixture_tracer_hammers_start(2)
    var failures: [String] = []
    var live: [Link] = []
    for round in 0..<rounds {
      let index = round % 3
      let handler: Handler
      switch round % 4 {
      case 0: handler = .entry(empty)
      case 1: handler = .exit(empty)
      case 2: handler = .modifyReturn(passThrough)
      default: handler = .entry(empty)
      }
      do {
        live.append(try tracer.attach(handler, to: .address(functions[index]), model: models[index]))
      } catch {
        failures.append("round \(round): \(error)")
        break
      }
      if live.count > 4 {
        let report = live.removeFirst().detach()
        if !report.failures.isEmpty { failures.append("round \(round): \(report)") }
      }
    }
    for link in live { link.detach() }
    var wrong: UInt64 = 0
    let calls = tracery_fixture_hammers_stop(&wrong)
    #expect(failures.isEmpty, "\(failures.prefix(3))")
    #expect(wrong == 0, "\(wrong) wrong results of \(calls)")
    #expect(calls > 0)
    #expect(tracer.reclaimAll(), "\(tracer.reclaimState)")
    #expect(functions.map { TextPatcher.read($0) } == before)
  }
}
