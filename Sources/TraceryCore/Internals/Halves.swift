import CTraceryShims

#if canImport(Glibc)
  import Glibc
#endif

/// Work over a long range done in two halves at once: the second on a thread made for it, the
/// first on the caller's, which then waits for the other. For resolving a large selection (50,000
/// functions' prologues decided took ~8.6 ms on one core; the machines this runs on have two or
/// more). No Dispatch or Swift concurrency: the agent links neither (every traced process would
/// load them).
///
/// Protocol: `body` runs on both threads at once, each over its own half, and must share only
/// what it reads; what it writes goes into its result. The helper thread holds the recursion
/// guard from its start (`ctracery_swap_guard`): in a traced process its calls into traced
/// library functions are not recorded as the program's. It ends before `split` returns.
enum Halves {
  /// Below this, one thread does it all (starting and joining a thread, and joining the
  /// results, would take much of what a short range saves).
  static let minimum = 4096

  /// `body` over `range` split in two (or whole: when short, when not `worthIt`, or when no
  /// thread can be made): the results in order. `worthIt`: the work per item is dear enough
  /// (deciding a relocation, ~170 ns); split, 50,000 NOP sites (~20 ns each) took longer than on
  /// one thread (joining the halves' results copies one of them).
  static func split<Result>(_ range: Range<Int>, if worthIt: Bool = true, _ body: (Range<Int>) -> Result) -> [Result] {
    guard worthIt, range.count >= minimum else { return [body(range)] }
    let middle = range.lowerBound + range.count / 2
    return withoutActuallyEscaping(body) { body in
      let second = Work(range: middle..<range.upperBound, body: body)
      var thread = pthread_t()
      let context = Unmanaged.passRetained(second).toOpaque()
      guard
        pthread_create(
          &thread, nil,
          { context in
            let work = Unmanaged<AnyObject>.fromOpaque(context!).takeRetainedValue() as! Runnable
            _ = ctracery_swap_guard(1)
            work.run()
            return nil
          }, context) == 0
      else {
        Unmanaged<Work<Result>>.fromOpaque(context).release()
        return [body(range)]
      }
      let first = body(range.lowerBound..<middle)
      pthread_join(thread, nil)
      return [first, second.result!]
    }
  }

  /// The arrays `take` moves out of `results` (`taken`), in order, as one: the first taken
  /// over rather than copied. (A closure, not a key path: a key path's first use costs every
  /// traced process ~70 µs of the Swift runtime instantiating it from its pattern.)
  static func joined<Result, Element>(_ results: inout [Result], _ take: (inout Result) -> [Element]) -> [Element] {
    guard !results.isEmpty else { return [] }
    var joined = take(&results[0])
    for index in results.indices.dropFirst() { joined.append(contentsOf: take(&results[index])) }
    return joined
  }

  /// `array`'s elements, leaving it empty.
  static func taken<Element>(_ array: inout [Element]) -> [Element] {
    var taken: [Element] = []
    swap(&taken, &array)
    return taken
  }

  private protocol Runnable: AnyObject { func run() }

  /// The second half: its range, the body, and (once the thread ran) the result.
  private final class Work<Result>: Runnable, @unchecked Sendable {
    // @unchecked: `result` is written by the helper thread only, and read after it was joined.
    let range: Range<Int>
    let body: (Range<Int>) -> Result
    var result: Result?

    init(range: Range<Int>, body: @escaping (Range<Int>) -> Result) {
      self.range = range
      self.body = body
    }

    func run() { result = body(range) }
  }
}
