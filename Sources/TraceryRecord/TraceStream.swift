/// Every chosen thread's events in one time order: a heap over per-thread cursors, each holding
/// its next event. Memory is bounded by the number of threads (one small state each) and the
/// cursors kept open (at most `openLimit` windows and descriptors: a trace of thousands of
/// processes opens only the threads busy at a time).
public struct TraceStream {
  public enum Item {
    /// `thread` indexes the stream's `threads`; `time` is in nanoseconds on the trace's time line.
    case event(thread: Int, event: Event, time: Double)
    /// The thread has no more events; `time` is its last event's.
    case end(thread: Int, time: Double)
  }

  public let threads: [ThreadFile]
  /// Called every 2^16 events with (events read, an estimate of all: the files' bytes / 12),
  /// for a progress line. Set by the command line before a reader runs; nil: no calls.
  nonisolated(unsafe) public static var progress: ((_ read: Int, _ estimated: Int) -> Void)?
  private var read = 0
  private let estimated: Int
  private let clocks: [Clock]
  private var cursors: [EventCursor]
  private var heads: [Event?]
  private var lastTimes: [Double]
  private var heap: [(time: Double, thread: Int)] = []
  private var ended: [Int] = []
  private var open: [Int] = []
  private let openLimit: Int

  public init(_ trace: Trace, threads chosen: [ThreadFile], openLimit: Int = 64) {
    threads = chosen
    estimated = max(1, chosen.reduce(0) { $0 + $1.size } / 12)
    let clocks = trace.clocks()
    self.clocks = chosen.map { clocks[$0.session] ?? Clock(rate: 1, startTicks: 0, offset: 0) }
    cursors = chosen.map { EventCursor($0) }
    heads = Array(repeating: nil, count: chosen.count)
    lastTimes = Array(repeating: 0, count: chosen.count)
    self.openLimit = max(openLimit, 1)
    for index in chosen.indices {
      heads[index] = cursors[index].next()
      cursors[index].release()
      if let event = heads[index] {
        push((self.clocks[index].nanoseconds(event.timestamp), index))
      } else {
        ended.append(index)
      }
    }
  }

  /// The time of an event of `thread`.
  public func time(_ event: Event, of thread: Int) -> Double { clocks[thread].nanoseconds(event.timestamp) }

  /// The damage the cursors found so far.
  public var damage: [Damage] { cursors.flatMap(\.damage) }

  public mutating func next() -> Item? {
    if let thread = ended.popLast() { return .end(thread: thread, time: lastTimes[thread]) }
    guard let (time, thread) = pop(), let event = heads[thread] else { return nil }
    lastTimes[thread] = time
    read += 1
    if read & 0xffff == 0, let progress = Self.progress { progress(read, estimated) }
    heads[thread] = advance(thread)
    if let next = heads[thread] {
      push((clocks[thread].nanoseconds(next.timestamp), thread))
    } else {
      cursors[thread].release()
      open.removeAll { $0 == thread }
      ended.append(thread)
    }
    return .event(thread: thread, event: event, time: time)
  }

  /// The events of `thread` after the one `next()` gave last, without moving the stream: for a
  /// reader that must know what follows a call before showing it.
  public func lookahead(_ thread: Int) -> Lookahead {
    Lookahead(first: heads[thread], cursor: cursors[thread], clock: clocks[thread])
  }

  public struct Lookahead: IteratorProtocol {
    var first: Event?
    var cursor: EventCursor
    let clock: Clock

    public mutating func next() -> (event: Event, time: Double)? {
      if let event = first {
        first = nil
        return (event, clock.nanoseconds(event.timestamp))
      }
      return cursor.next().map { ($0, clock.nanoseconds($0.timestamp)) }
    }
  }

  /// Reads `thread`'s next event, keeping at most `openLimit` cursors open (the least recently
  /// read gives its window back).
  private mutating func advance(_ thread: Int) -> Event? {
    if open.last != thread {
      if let index = open.firstIndex(of: thread) {
        open.remove(at: index)
      } else if open.count >= openLimit {
        cursors[open.removeFirst()].release()
      }
      open.append(thread)
    }
    return cursors[thread].next()
  }

  // A binary min-heap on (time, thread): ties go to the lower thread index.
  private static func before(_ a: (time: Double, thread: Int), _ b: (time: Double, thread: Int)) -> Bool {
    a.time < b.time || (a.time == b.time && a.thread < b.thread)
  }

  private mutating func push(_ item: (time: Double, thread: Int)) {
    heap.append(item)
    var child = heap.count - 1
    while child > 0 {
      let parent = (child - 1) / 2
      guard Self.before(heap[child], heap[parent]) else { break }
      heap.swapAt(child, parent)
      child = parent
    }
  }

  private mutating func pop() -> (time: Double, thread: Int)? {
    guard let top = heap.first else { return nil }
    let last = heap.removeLast()
    if !heap.isEmpty {
      heap[0] = last
      var parent = 0
      while true {
        let left = 2 * parent + 1
        let right = left + 1
        var smallest = parent
        if left < heap.count, Self.before(heap[left], heap[smallest]) { smallest = left }
        if right < heap.count, Self.before(heap[right], heap[smallest]) { smallest = right }
        guard smallest != parent else { break }
        heap.swapAt(parent, smallest)
        parent = smallest
      }
    }
    return top
  }
}
