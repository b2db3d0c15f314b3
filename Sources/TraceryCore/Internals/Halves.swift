import CTraceryShims
import Synchronization

#if canImport(Glibc)
  import Glibc
#endif

/// Work over a long range shared by two threads: the caller's and one made for it, each taking
/// the next piece (`piece` items) from a shared counter until none is left; the caller then waits
/// for the other. For resolving a large selection (50,000 functions' prologues decided took
/// ~7 ms on one core; the machines this runs on have two or more). No Dispatch or Swift
/// concurrency: the agent links neither (every traced process would load them).
///
/// Pieces, not two fixed halves: on this project's machine (a VM) one of the two vCPUs often runs
/// at half speed while both are busy (the relocation check alone: 37 ns a function on each, or
/// 37 and 66, from run to run), and the faster thread then waited for the slower one's half.
///
/// Protocol: `body` runs on both threads at once, each over its own pieces, and must share only
/// what it reads; what it writes goes into its result. The helper thread holds the recursion
/// guard from its start (`ctracery_swap_guard`): in a traced process its calls into traced
/// library functions are not recorded as the program's. It ends before `split` returns.
enum Halves {
  /// Below this, one thread does it all (starting and joining a thread, and joining the
  /// results, would take much of what a short range saves).
  static let minimum = 4096

  /// Items a thread takes at a time: a few dozen pieces for 50,000 functions, each worth far
  /// more than taking it (an atomic add) and the per-piece start of `body`.
  static let piece = 2048

  /// `body` over `range` in pieces shared by two threads (or whole, on this thread: when short,
  /// when not `worthIt`, or when no thread can be made): the results in order, one per piece.
  /// `worthIt`: the work per item is dear enough (deciding a relocation, ~130 ns); split,
  /// 50,000 NOP sites (~20 ns each) took longer than on one thread (the thread's start, and
  /// joining the pieces' results).
  static func split<Result>(_ range: Range<Int>, if worthIt: Bool = true, _ body: (Range<Int>) -> Result) -> [Result] {
    guard worthIt, range.count >= minimum else { return [body(range)] }
    return withoutActuallyEscaping(body) { body in
      let work = Work(range: range, body: body)
      var thread = pthread_t()
      let context = Unmanaged.passRetained(work).toOpaque()
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
      work.run()
      pthread_join(thread, nil)
      return work.results()
    }
  }

  /// The elements of every piece's `Output` (`output`), in order, as one array: moved, not
  /// copied. (Copying a piece's array into the whole, then releasing it, went through the element
  /// type's witnesses twice an element: ~16 ns each, 0.8 ms of joining 50,000 targets. `output`
  /// is a closure, not a key path: a key path's first use costs every traced process ~70 µs of
  /// the Swift runtime instantiating it from its pattern.)
  static func joined<Result, Element>(_ results: [Result], _ output: (Result) -> Output<Element>) -> [Element] {
    let parts = results.map(output)
    let total = parts.reduce(0) { $0 + $1.count }
    return [Element](unsafeUninitializedCapacity: total) { buffer, initialized in
      for part in parts { initialized += part.move(to: buffer.baseAddress! + initialized) }
    }
  }

  /// What one piece produces, in memory of its own, so that `joined` can move it into the whole.
  /// Made and filled by the piece's thread, moved out after both threads ran.
  /// Invariant: `elements[0..<count]` are initialized, the rest of `capacity` is not; what is
  /// still there when it goes is deinitialized then.
  final class Output<Element> {
    private let elements: UnsafeMutablePointer<Element>
    private let capacity: Int
    private(set) var count = 0

    /// Room for `capacity` elements: a piece's items, each adding at most one.
    init(capacity: Int) {
      self.capacity = capacity
      elements = .allocate(capacity: max(1, capacity))
    }

    deinit {
      elements.deinitialize(count: count)
      elements.deallocate()
    }

    func append(_ element: Element) {
      precondition(count < capacity, "a piece added more elements than it has items")
      (elements + count).initialize(to: element)
      count += 1
    }

    /// Moves every element to `destination` (uninitialized), leaving none; returns how many.
    fileprivate func move(to destination: UnsafeMutablePointer<Element>) -> Int {
      let moved = count
      destination.moveInitialize(from: elements, count: moved)
      count = 0
      return moved
    }
  }

  private protocol Runnable: AnyObject { func run() }

  /// The range, the body, the counter both threads take pieces from, and each piece's result.
  private final class Work<Result>: Runnable, @unchecked Sendable {
    // @unchecked: each slot of `slots` is written by the one thread that took its piece (the
    // counter hands each out once), and all are read after the helper was joined.
    let range: Range<Int>
    let body: (Range<Int>) -> Result
    let count: Int
    let next = Atomic<Int>(0)
    let slots: UnsafeMutablePointer<Result?>

    init(range: Range<Int>, body: @escaping (Range<Int>) -> Result) {
      self.range = range
      self.body = body
      count = (range.count + Halves.piece - 1) / Halves.piece
      slots = .allocate(capacity: count)
      slots.initialize(repeating: nil, count: count)
    }

    deinit {
      slots.deinitialize(count: count)
      slots.deallocate()
    }

    func run() {
      while true {
        let index = next.wrappingAdd(1, ordering: .relaxed).oldValue
        guard index < count else { return }
        let start = range.lowerBound + index * Halves.piece
        slots[index] = body(start..<min(range.upperBound, start + Halves.piece))
      }
    }

    /// Every piece's result, in order (after both threads ran).
    func results() -> [Result] { (0..<count).map { slots[$0].take()! } }
  }
}
