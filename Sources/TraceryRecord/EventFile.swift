#if canImport(Glibc)
  import Glibc
#endif

/// One thread's event file, written through shared mappings: the header page stays mapped, and
/// events go into one mapped chunk at a time. The page cache holds everything written, so a
/// crash or `kill -9` of the traced program loses nothing already stored.
///
/// Each chunk taken asks `ChunkPreparer`'s helper thread to map and fault in the one after it, so
/// the owning thread usually finds its next chunk ready; when it is not (the helper is behind or
/// could not start), the owning thread maps it itself.
///
/// Protocol: only the owning thread calls `nextChunk`, `countDropped` and `close` (the agent
/// calls them from the recorder's refill, with the recursion guard held); only the helper calls
/// `prepare`. `prepared` is shared by both, under `lock`.
public final class EventFile: @unchecked Sendable {
  // @unchecked: the owning thread's fields are touched by it alone; `prepared` is under `lock`.
  private let fd: Int32
  private let header: UnsafeMutableRawPointer
  public let chunkSize: Int
  private let limit: Int
  private var chunks = 0
  private var chunk: UnsafeMutableRawPointer?
  private let lock: UnsafeMutablePointer<pthread_mutex_t> = {
    let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    pthread_mutex_init(lock, nil)
    return lock
  }()
  /// The chunk the helper is preparing (address 0) or has prepared; index -1: none wanted.
  private var prepared: (index: Int, address: UInt) = (-1, 0)
  private var closed = false

  deinit {
    pthread_mutex_destroy(lock)
    lock.deallocate()
  }

  /// Creates the file and its header. nil when it cannot be created or mapped.
  public init?(path: String, pid: Int32, tid: Int32, chunkSize: Int, limit: Int) {
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { return nil }
    guard ftruncate(fd, off_t(TraceFormat.headerSize)) == 0,
      let mapped = mmap(nil, TraceFormat.headerSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), mapped != MAP_FAILED
    else {
      Glibc.close(fd)
      return nil
    }
    header = mapped
    self.chunkSize = chunkSize
    self.limit = limit
    for (index, byte) in TraceFormat.magic.enumerated() {
      header.storeBytes(of: byte, toByteOffset: index, as: UInt8.self)
    }
    header.storeBytes(of: TraceFormat.version, toByteOffset: TraceFormat.Header.version, as: UInt32.self)
    header.storeBytes(of: UInt32(bitPattern: pid), toByteOffset: TraceFormat.Header.pid, as: UInt32.self)
    header.storeBytes(of: UInt32(bitPattern: tid), toByteOffset: TraceFormat.Header.tid, as: UInt32.self)
    header.storeBytes(of: UInt64(chunkSize), toByteOffset: TraceFormat.Header.chunkSize, as: UInt64.self)
  }

  /// Maps the next chunk (growing the file) and returns it; nil when the limit is reached or
  /// the file cannot grow (disk full): the caller then counts drops.
  public func nextChunk() -> UnsafeMutableRawBufferPointer? {
    guard hasRoom(for: chunks) else { return nil }
    // The first chunk is faulted in here, before the thread's first event takes its time: the
    // first write to a fresh file page costs ~200 µs on ext4 here, which the first recorded call
    // would otherwise show as its own.
    guard let mapped = takePrepared(chunks) ?? map(chunks, populate: chunks == 0) else { return nil }
    if let chunk { munmap(chunk, chunkSize) }
    chunk = mapped
    chunks += 1
    if hasRoom(for: chunks) {
      withLock { prepared = (chunks, 0) }
      ChunkPreparer.shared.request(self, index: chunks)
    }
    return UnsafeMutableRawBufferPointer(start: mapped, count: chunkSize)
  }

  /// Run by the helper thread: maps chunk `index` and faults its pages in for writing; keeps it
  /// if it is still wanted, else unmaps it.
  func prepare(_ index: Int) {
    let wanted = withLock { prepared.index == index && !closed }
    guard wanted, let mapped = map(index, populate: true) else { return }
    let kept = withLock {
      guard prepared.index == index, !closed else { return false }
      prepared.address = UInt(bitPattern: mapped)
      return true
    }
    if !kept { munmap(mapped, chunkSize) }
  }

  /// The prepared chunk `index` if the helper finished it; else nil, and the helper's work (when
  /// it finishes) is thrown away.
  private func takePrepared(_ index: Int) -> UnsafeMutableRawPointer? {
    withLock {
      defer { prepared = (-1, 0) }
      return prepared.index == index ? UnsafeMutableRawPointer(bitPattern: prepared.address) : nil
    }
  }

  private func hasRoom(for index: Int) -> Bool {
    TraceFormat.headerSize + (index + 1) * chunkSize <= limit + TraceFormat.headerSize
  }

  private func map(_ index: Int, populate: Bool) -> UnsafeMutableRawPointer? {
    let offset = TraceFormat.headerSize + index * chunkSize
    // fallocate reserves the blocks now, so a full disk is seen here, not as SIGBUS later.
    guard posix_fallocate(fd, off_t(offset), off_t(chunkSize)) == 0,
      let mapped = mmap(nil, chunkSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(offset)),
      mapped != MAP_FAILED
    else { return nil }
    // MADV_POPULATE_WRITE (Linux 5.14): write-faults every page now. Failing is harmless.
    if populate { _ = madvise(mapped, chunkSize, 23) }
    return mapped
  }

  private func withLock<T>(_ body: () -> T) -> T {
    pthread_mutex_lock(lock)
    defer { pthread_mutex_unlock(lock) }
    return body()
  }

  /// One more event that found no room (kept in the header: every reader shows it).
  public func countDropped() {
    let dropped = header.load(fromByteOffset: TraceFormat.Header.dropped, as: UInt64.self)
    header.storeBytes(of: dropped + 1, toByteOffset: TraceFormat.Header.dropped, as: UInt64.self)
  }

  public func close() {
    if let chunk { munmap(chunk, chunkSize) }
    chunk = nil
    if let unused = withLock({ () -> UnsafeMutableRawPointer? in
      closed = true
      return UnsafeMutableRawPointer(bitPattern: prepared.address)
    }) {
      munmap(unused, chunkSize)
    }
    munmap(header, TraceFormat.headerSize)
    Glibc.close(fd)
  }
}
