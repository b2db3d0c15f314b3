#if canImport(Glibc)
  import Glibc
#endif

/// One thread's event file, written through shared mappings: the header page stays mapped, and
/// events go into one mapped chunk at a time. The page cache holds everything written, so a
/// crash or `kill -9` of the traced program loses nothing already stored.
///
/// The owner asks `ChunkPreparer`'s helper thread to map and fault in the chunk after the current
/// one (`prepareNext`: half way through the first chunk, at the start of every later one), so the
/// owning thread usually finds its next chunk ready; when it is not (the helper is behind or could
/// not start), the owning thread maps it itself.
///
/// Every chunk begins with its seal (`ChunkSeal`), written when its thread leaves it: by the
/// helper, which then unmaps it (`nextChunk`), or by the thread itself at its exit or the
/// process's (`finish`, `close`).
///
/// The file's descriptor is the program's as much as ours (a program may close every descriptor
/// it did not open and open its own files, which then get our number): it is a `CheckedFile`,
/// checked before every use and opened again through the trace directory's kept descriptor.
/// (Used unchecked, the zeros of the next chunk and then the chunk's events went into the
/// program's own file.)
///
/// Protocol: only the owning thread calls `nextChunk`, `prepareNext`, `countDropped`, `finish` and
/// `close` (the agent calls them from the recorder's refill, with the recursion guard held, and
/// at exit); only the helper calls `prepare`. `prepared` is shared by both, under `lock`.
public final class EventFile: @unchecked Sendable {
  // @unchecked: the owning thread's fields are touched by it alone; `prepared` is under `lock`,
  // the descriptor guards itself.
  private let file: CheckedFile
  private let header: UnsafeMutableRawPointer
  public let chunkSize: Int
  private let limit: Int
  private var chunks = 0
  /// The file is an events blank (`BlankFiles.Kind.events`): its first chunk is reserved and
  /// begins with zeros written, as `map` would make it.
  private let firstChunkReady: Bool
  private var chunk: UnsafeMutableRawPointer?
  private let lock: UnsafeMutablePointer<pthread_mutex_t> = {
    let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    pthread_mutex_init(lock, nil)
    return lock
  }()
  /// The chunks wanted from the helper: index → address once prepared; `Self.asked` until the
  /// helper starts on it, `Self.writing` while it writes the chunk's zeros.
  private var prepared: [Int: UInt] = [:]
  private static let asked: UInt = 0
  private static let writing: UInt = 1
  /// Held by the helper while it writes a chunk's zeros (`prepare`): the owner waits for it
  /// rather than map that chunk itself (the zeros would land on its events), and `close` waits
  /// for it before the descriptor goes (or the zeros could land in a file that reused it).
  /// Order: `writer` before `lock`; nobody waits for `writer` while holding `lock`.
  private let writer: UnsafeMutablePointer<pthread_mutex_t> = {
    let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    pthread_mutex_init(lock, nil)
    return lock
  }()
  private var closed = false
  /// Set by `finish`: no chunk is taken after it.
  private var finished = false
  /// The file offset just past the last event of the last chunk left.
  private var lastEnd = TraceFormat.headerSize

  deinit {
    pthread_mutex_destroy(lock)
    lock.deallocate()
    pthread_mutex_destroy(writer)
    writer.deallocate()
  }

  /// Creates the file `name` in `directory` and its header. nil when it cannot be created or
  /// mapped.
  public init?(in directory: TraceDirectory, name: String, pid: Int32, tid: Int32, chunkSize: Int, limit: Int) {
    // A new file, never through a symbolic link, readable by its owner only (unless shared).
    let kind: BlankFiles.Kind = chunkSize == Self.standardChunkSize ? .events : .empty
    guard let file = directory.create(name, flags: O_RDWR, reopenFlags: O_RDWR, kind: kind) else { return nil }
    var ready = false
    let mapped = file.withDescriptor { fd -> UnsafeMutableRawPointer? in
      var status = stat()
      ready = kind == .events && fstat(fd, &status) == 0 && status.st_size == kind.size
      guard Self.fits(TraceFormat.headerSize), ready || ftruncate(fd, off_t(TraceFormat.headerSize)) == 0,
        let mapped = mmap(nil, TraceFormat.headerSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0),
        mapped != MAP_FAILED
      else { return nil }
      return mapped
    }
    guard let mapped else {
      file.close()
      return nil
    }
    firstChunkReady = ready
    self.file = file
    header = mapped
    self.chunkSize = chunkSize
    self.limit = limit
    for (index, byte) in TraceFormat.magic.enumerated() {
      header.storeBytes(of: byte, toByteOffset: index, as: UInt8.self)
    }
    header.storeBytes(of: TraceFormat.version, toByteOffset: TraceFormat.Header.version, as: UInt32.self)
    header.storeBytes(of: UInt32(bitPattern: pid), toByteOffset: TraceFormat.Header.pid, as: UInt32.self)
    header.storeBytes(of: UInt64(chunkSize), toByteOffset: TraceFormat.Header.chunkSize, as: UInt64.self)
    if tid != 0 { adopt(tid: tid) }
  }

  /// Names the thread that writes this file in its header: its id and (at most 15 bytes) its
  /// name, for readers. A spare file (made with thread id 0, before the program dropped its
  /// privileges: `Agent.prepareSpareFiles`) is adopted by the thread that takes it.
  public func adopt(tid: Int32) {
    header.storeBytes(of: UInt32(bitPattern: tid), toByteOffset: TraceFormat.Header.tid, as: UInt32.self)
    if let name = Files.readPrefix("/proc/thread-self/comm", count: 16) {
      for (index, byte) in name.prefix(while: { $0 != 0x0a }).prefix(15).enumerated() {
        header.storeBytes(of: byte, toByteOffset: TraceFormat.Header.name + index, as: UInt8.self)
      }
    }
  }

  /// Leaves the current chunk, whose events end at `cursor` (sealed and unmapped by the helper),
  /// then maps the next chunk (growing the file) and returns it; its events start after its seal
  /// (`ChunkSeal.size`). nil when the limit is reached, the file cannot grow (disk full) or the
  /// file is finished: the caller then counts drops.
  public func nextChunk(leaving cursor: UInt64) -> UnsafeMutableRawBufferPointer? {
    if let chunk {
      let length = sealedLength(cursor)
      // A dirty shared mapping's munmap takes the mmap lock and walks its pages, and the seal
      // reads the whole chunk: the helper does both when there is one, not the traced thread.
      ChunkPreparer.shared.retire(chunk, chunkSize, sealing: length)
      self.chunk = nil
    }
    guard !finished, hasRoom(for: chunks) else { return nil }
    // The first chunk's first 64 KiB are written here (or were, in an events blank), before the
    // thread's first event takes its time: a fault in a fresh file's unwritten extent costs ~210
    // µs on ext4 here, which the first recorded call would otherwise show as its own; in written
    // pages ~2 µs. Its first `firstPopulated` bytes are faulted in now, the rest as the thread
    // fills them: all 64 KiB cost every thread's start ~45 µs, and a short process's thread
    // (a compiler's child, a shell command) writes one or two pages.
    let first = chunks == 0 ? Self.firstPages : 0
    guard
      let mapped = takePrepared(chunks)
        ?? map(chunks, writing: first, ready: chunks == 0 && firstChunkReady).map({
          Self.populate($0, min(first, Self.firstPopulated))
        })
    else {
      return nil
    }
    chunk = mapped
    chunks += 1
    return UnsafeMutableRawBufferPointer(start: mapped, count: chunkSize)
  }

  /// Whether `finish` ended this file (the thread's recording ended at the process's exit).
  public var isFinished: Bool { finished }

  /// Chunks taken so far (the current one included).
  public var chunksTaken: Int { chunks }

  /// The current chunk's bytes of events if they end at `cursor`; remembers where they end in
  /// the file (`lastEnd`).
  private func sealedLength(_ cursor: UInt64) -> Int {
    let start = UInt64(UInt(bitPattern: chunk!)) + UInt64(ChunkSeal.size)
    let length = cursor > start ? min(Int(cursor - start), chunkSize - ChunkSeal.size) / 8 * 8 : 0
    lastEnd = TraceFormat.headerSize + (chunks - 1) * chunkSize + ChunkSeal.size + length
    return length
  }

  /// The end address of the current chunk (0 before the first).
  public var chunkEnd: UInt64 { chunk.map { UInt64(UInt(bitPattern: $0)) + UInt64(chunkSize) } ?? 0 }

  /// Asks the helper to prepare the chunk after the current one. For the first chunk the agent
  /// calls it when that chunk is half full: a process that never fills half a chunk (most
  /// short-lived processes) costs no second chunk, and the helper's work does not compete with
  /// the program's start (it did: ~0.75 ms of a thread start here, on two cores).
  /// Two chunks are asked for ahead: preparing one takes the helper about as long as filling
  /// one takes the thread (~0.9 ms against ~1.1 ms here), so one ahead fell behind at the
  /// slightest delay, and the thread then faulted the pages itself.
  public func prepareNext() {
    let wanted = withLock { () -> [Int] in
      let indices = (chunks..<(chunks + Self.ahead)).filter { hasRoom(for: $0) && prepared[$0] == nil }
      for index in indices { prepared[index] = Self.asked }
      return indices
    }
    for index in wanted { ChunkPreparer.shared.request(self, index: index) }
  }

  /// Chunks prepared ahead of the one being filled.
  static let ahead = 2

  /// Run by the helper thread: writes chunk `index`'s zeros and maps it, offers it (if it is
  /// still wanted), then faults its pages in for writing. The owner may take it before that is
  /// done and write into it meanwhile: the pages it reaches first it faults itself (cheaply:
  /// they are in the page cache), the rest are ready. (Offered only once populated, a chunk the
  /// helper was late with was thrown away and mapped again by the owner, which then faulted
  /// every page, and the helper fell further behind.) The chunk is unmapped by this same helper
  /// once its owner is done (`ChunkPreparer.unmap`), after this.
  func prepare(_ index: Int) {
    pthread_mutex_lock(writer)
    let wanted = withLock {
      guard prepared[index] == Self.asked, !closed else { return false }
      prepared[index] = Self.writing
      return true
    }
    guard wanted else {
      pthread_mutex_unlock(writer)
      return
    }
    let mapped = map(index, writing: chunkSize)
    withLock { prepared[index] = mapped.map { UInt(bitPattern: $0) } ?? Self.asked }
    pthread_mutex_unlock(writer)
    if let mapped { Self.populate(mapped, chunkSize) }
  }

  /// The prepared chunk `index` if the helper finished it (waiting while it writes it); else
  /// nil, and the helper's work on it (when it starts) is skipped.
  private func takePrepared(_ index: Int) -> UnsafeMutableRawPointer? {
    if withLock({ prepared[index] == Self.writing }) {
      pthread_mutex_lock(writer)
      pthread_mutex_unlock(writer)
    }
    return withLock {
      let address = prepared.removeValue(forKey: index) ?? Self.asked
      return address > Self.writing ? UnsafeMutableRawPointer(bitPattern: address) : nil
    }
  }

  private func hasRoom(for index: Int) -> Bool {
    TraceFormat.headerSize + (index + 1) * chunkSize <= limit + TraceFormat.headerSize
  }

  /// Whether a file may grow to `size` bytes under RLIMIT_FSIZE.
  static func fits(_ size: Int) -> Bool {
    var limit = rlimit()
    guard getrlimit(Int32(RLIMIT_FSIZE.rawValue), &limit) == 0, limit.rlim_cur != rlim_t.max else { return true }
    return UInt64(size) <= UInt64(limit.rlim_cur)
  }

  /// Bytes of a thread's first chunk written (as zeros) before its first event.
  static let firstPages = 64 << 10

  /// Bytes of a thread's first chunk faulted in before its first event (measured here, a fresh
  /// process's `MADV_POPULATE_WRITE` of an events blank's pages: 2 pages 17.5 µs, 16 pages 44).
  static let firstPopulated = 8 << 10

  /// The agent's chunk size: what events blanks are made ready for (`BlankFiles.Kind.events`).
  public static let standardChunkSize = 1 << 20

  /// Makes the new, empty file `fd` an events blank: its header and first chunk as `init` and
  /// `map` make them for a chunk of `standardChunkSize` (run by the blank keeper, off the
  /// traced threads' paths). Whether it could.
  static func prepareBlank(_ fd: Int32) -> Bool {
    let written = TraceFormat.headerSize + firstPages
    let size = BlankFiles.Kind.events.size
    return writeZeros(at: 0, count: written, to: { fd })
      && posix_fallocate(fd, off_t(written), off_t(size - written)) == 0
  }

  /// Maps chunk `index`, its first `written` bytes written as zeros first (then faulted in by
  /// `populate`), the rest reserved.
  ///
  /// Why zeros through `pwrite`: a page of a fallocated (unwritten) extent costs ~3.5 µs at its
  /// first write fault (ext4 reads it through readahead, then converts the extent), a page
  /// `pwrite` filled ~0.3 µs to write and ~0.15 µs to fault in. Measured here, a whole 1 MiB
  /// chunk: fallocate + populate 0.9 ms, pwrite + populate 0.45 ms; a thread's first 64 KiB:
  /// 264 µs against 46 µs. Both ways reserve the blocks now, so a full disk is seen here
  /// (ENOSPC: no chunk, events dropped and counted), not as SIGBUS later. Growing past the
  /// process's file-size limit would raise SIGXFSZ, which kills the program by default: that
  /// limit is checked first.
  /// `ready`: the chunk is so already (an events blank's first).
  private func map(_ index: Int, writing written: Int, ready: Bool = false) -> UnsafeMutableRawPointer? {
    let offset = TraceFormat.headerSize + index * chunkSize
    let written = min(written, chunkSize)
    guard Self.fits(offset + chunkSize) else { return nil }
    return file.withDescriptor { fd in
      // (Checked again before each 64 KiB of zeros: a long write is a long window.)
      guard ready || Self.writeZeros(at: offset, count: written, to: { self.file.isOurs(fd) ? fd : nil }),
        ready || written == chunkSize
          || posix_fallocate(fd, off_t(offset + written), off_t(chunkSize - written)) == 0,
        self.file.isOurs(fd),
        let mapped = mmap(nil, chunkSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(offset)),
        mapped != MAP_FAILED
      else { return nil }
      return mapped
    }
  }

  /// 64 KiB of zeros for `writeZeros` (never written).
  nonisolated(unsafe) private static let zeros = UnsafeRawPointer(calloc(1, 64 << 10)!)

  private static func writeZeros(at offset: Int, count: Int, to file: () -> Int32?) -> Bool {
    var done = 0
    while done < count {
      guard let fd = file() else { return false }
      let written = pwrite(fd, zeros, min(64 << 10, count - done), off_t(offset + done))
      if written < 0 && errno == EINTR { continue }
      guard written > 0 else { return false }
      done += written
    }
    return true
  }

  /// MADV_POPULATE_WRITE (Linux 5.14): write-faults the pages now (failing is harmless: the
  /// range may have been unmapped meanwhile). In 64 KiB steps: it holds the process's mmap lock
  /// while it runs, and a whole chunk (~0.9 ms) stalled the traced program's own mmap/munmap
  /// calls (thread stacks, large mallocs) that long.
  @discardableResult
  private static func populate(_ mapped: UnsafeMutableRawPointer, _ count: Int) -> UnsafeMutableRawPointer {
    var done = 0
    while done < count {
      let step = min(64 << 10, count - done)
      _ = madvise(mapped + done, step, 23)
      done += step
    }
    return mapped
  }

  private func withLock<T>(_ body: () -> T) -> T {
    pthread_mutex_lock(lock)
    defer { pthread_mutex_unlock(lock) }
    return body()
  }

  /// More events that found no room (kept in the header: every reader shows it).
  public func countDropped(_ events: UInt64 = 1) {
    let dropped = header.load(fromByteOffset: TraceFormat.Header.dropped, as: UInt64.self)
    header.storeBytes(of: dropped &+ events, toByteOffset: TraceFormat.Header.dropped, as: UInt64.self)
  }

  /// The calls its thread left untraced because their caller was in no known code (kept in the
  /// header, as `countDropped`'s events are).
  public func setForeignCalls(_ calls: UInt64) {
    header.storeBytes(of: calls, toByteOffset: TraceFormat.Header.foreignCalls, as: UInt64.self)
  }

  /// Seals the current chunk (its events end at `cursor`) on this thread, and takes no chunk
  /// after it: later events are dropped and counted. At process exit, for the exiting thread:
  /// the seal must be on disk before the process is gone, and events after it would break it.
  /// `unmapping` false: the chunk stays mapped (a sandboxed process makes no system call,
  /// `Agent.enterSandbox`; the kernel writes a shared mapping's pages back after the process is
  /// gone). Returns the file offset where the events end.
  @discardableResult
  public func finish(cursor: UInt64, unmapping: Bool = true) -> Int {
    if let chunk {
      ChunkSeal.seal(chunk, length: sealedLength(cursor))
      if unmapping { munmap(chunk, chunkSize) }
      self.chunk = nil
    }
    finished = true
    return lastEnd
  }

  /// Run first on the helper thread that prepares and retires chunks (the agent holds that
  /// thread's recursion guard: its calls are never the program's).
  nonisolated(unsafe) public static var helperThreadStarts: (() -> Void)?

  /// Makes the chunk preparer now (its `fork` handlers registered with it), on the thread that
  /// starts the agent, before the program's threads: made by the first thread to record, a
  /// `fork` by another thread while that ran left the child waiting forever, at its exit, for an
  /// initialization no thread of its finishes (`swift_once`: the forkthreads reliability test
  /// hung in CI so).
  public static func makePreparer() { _ = ChunkPreparer.shared }

  /// At process exit: seals the chunks other threads left that the helper has not sealed yet.
  public static func sealLeftChunks() { ChunkPreparer.shared.drain() }

  /// Waits until the helper thread has done every job asked for (`ChunkPreparer.quiesce`).
  public static func quiesceHelper() { ChunkPreparer.shared.quiesce() }

  /// `finish`es the file (events end at `cursor`) and gives it back: at thread exit.
  @discardableResult
  public func close(cursor: UInt64) -> Int {
    let end = finish(cursor: cursor)
    pthread_mutex_lock(writer)
    let unused = withLock { () -> [UInt] in
      closed = true
      return prepared.values.filter { $0 > Self.writing }
    }
    pthread_mutex_unlock(writer)
    for address in unused { munmap(UnsafeMutableRawPointer(bitPattern: address), chunkSize) }
    munmap(header, TraceFormat.headerSize)
    file.close()
    return end
  }
}
