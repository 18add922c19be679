package dev.facegate.example;

import com.google.protobuf.ByteString;
import dev.facegate.v1.CheckLivenessRequest;
import dev.facegate.v1.CheckLivenessResponse;
import dev.facegate.v1.Clip;
import dev.facegate.v1.IdentificationServiceGrpc;
import dev.facegate.v1.IdentifyFromClipRequest;
import dev.facegate.v1.IdentifyFromClipResponse;
import dev.facegate.v1.Image;
import dev.facegate.v1.LivenessServiceGrpc;
import io.grpc.Channel;
import io.grpc.ClientInterceptors;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.StatusRuntimeException;
import io.grpc.netty.GrpcSslContexts;
import io.grpc.netty.NettyChannelBuilder;
import io.grpc.stub.MetadataUtils;
import io.netty.handler.ssl.SslContextBuilder;
import java.io.File;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.TimeUnit;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Collectors;
import java.util.stream.Stream;

/**
 * facegate example client in Java: CheckLiveness on image files, IdentifyFromClip on a folder of frames.
 *
 * <pre>
 * FacegateClient [--target HOST:PORT] [--deadline-ms N] [--tls-ca FILE] liveness IMAGE...
 * FacegateClient [--target HOST:PORT] [--deadline-ms N] [--tls-ca FILE] identify COLLECTION DIR --fps F
 * </pre>
 *
 * <p>Caller identity: {@code --token-file FILE} sends {@code authorization: Bearer <token>} on every call;
 * {@code --tls-cert FILE --tls-key FILE} (with {@code --tls-ca}) present a client certificate for mutual TLS.
 */
public final class FacegateClient {
  private static final Pattern DIGITS = Pattern.compile("\\d+");

  private static long frameNumber(Path p) {
    String name = p.getFileName().toString();
    String stem = name.contains(".") ? name.substring(0, name.lastIndexOf('.')) : name;
    Matcher m = DIGITS.matcher(stem);
    long n = -1;
    while (m.find()) {
      n = Long.parseLong(m.group());
    }
    return n;
  }

  private static List<Path> framesOf(String dir) throws IOException {
    try (Stream<Path> files = Files.list(Paths.get(dir))) {
      return files
          .filter(p -> p.getFileName().toString().toLowerCase(Locale.ROOT)
              .matches(".*\\.(jpg|jpeg|png|webp|bmp)$"))
          .sorted((a, b) -> frameNumber(a) != frameNumber(b)
              ? Long.compare(frameNumber(a), frameNumber(b)) : a.compareTo(b))
          .collect(Collectors.toList());
    }
  }

  public static void main(String[] argv) throws Exception {
    String target = "127.0.0.1:50051";
    String caFile = null;
    String certFile = null;
    String keyFile = null;
    String tokenFile = null;
    long deadlineMs = 10000;
    double fps = 0;
    List<String> args = new ArrayList<>();
    for (int i = 0; i < argv.length; i++) {
      switch (argv[i]) {
        case "--target": target = argv[++i]; break;
        case "--deadline-ms": deadlineMs = Long.parseLong(argv[++i]); break;
        case "--tls-ca": caFile = argv[++i]; break;
        case "--tls-cert": certFile = argv[++i]; break;
        case "--tls-key": keyFile = argv[++i]; break;
        case "--token-file": tokenFile = argv[++i]; break;
        case "--fps": fps = Double.parseDouble(argv[++i]); break;
        default: args.add(argv[i]);
      }
    }
    if (args.isEmpty()) {
      System.err.println("usage: FacegateClient [flags] liveness IMAGE... | identify COLLECTION DIR --fps F");
      System.exit(2);
    }
    NettyChannelBuilder builder = NettyChannelBuilder.forTarget(target).maxInboundMessageSize(64 << 20);
    if (caFile != null) {
      SslContextBuilder ssl = GrpcSslContexts.forClient().trustManager(new File(caFile));
      if (certFile != null) {  // mutual TLS: the client certificate identifies the caller
        ssl.keyManager(new File(certFile), new File(keyFile));
      }
      builder.sslContext(ssl.build());
    } else {
      builder.usePlaintext();
    }
    ManagedChannel managed = builder.build();
    Channel channel = managed;
    if (tokenFile != null) {  // every call carries the bearer token
      Metadata headers = new Metadata();
      String token = new String(Files.readAllBytes(Paths.get(tokenFile)), "UTF-8").trim();
      headers.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + token);
      channel = ClientInterceptors.intercept(managed, MetadataUtils.newAttachHeadersInterceptor(headers));
    }
    int failures = 0;
    try {
      if (args.get(0).equals("liveness")) {
        LivenessServiceGrpc.LivenessServiceBlockingStub stub = LivenessServiceGrpc.newBlockingStub(channel);
        for (String path : args.subList(1, args.size())) {
          try {
            CheckLivenessRequest req = CheckLivenessRequest.newBuilder()
                .setImage(Image.newBuilder().setData(ByteString.copyFrom(Files.readAllBytes(Paths.get(path)))))
                .build();
            CheckLivenessResponse resp =
                stub.withDeadlineAfter(deadlineMs, TimeUnit.MILLISECONDS).checkLiveness(req);
            String decision = resp.getDecision().name().replaceFirst("^DECISION_", "");
            System.out.printf(Locale.ROOT, "%s\t%s\tlive_score=%.9f%n", path, decision, resp.getLiveScore());
          } catch (StatusRuntimeException e) {
            System.out.printf("%s\tERROR\t%s%n", path, e.getStatus());
            failures++;
          }
        }
      } else if (args.get(0).equals("identify") && args.size() == 3) {
        Clip.Builder clip = Clip.newBuilder().setFps(fps);
        for (Path p : framesOf(args.get(2))) {
          clip.addFrames(Image.newBuilder().setData(ByteString.copyFrom(Files.readAllBytes(p))));
        }
        IdentifyFromClipRequest req = IdentifyFromClipRequest.newBuilder()
            .setCollection(args.get(1)).setClip(clip).setTopK(3).build();
        try {
          IdentifyFromClipResponse resp = IdentificationServiceGrpc.newBlockingStub(channel)
              .withDeadlineAfter(deadlineMs, TimeUnit.MILLISECONDS).withMaxOutboundMessageSize(64 << 20)
              .identifyFromClip(req);
          String decision = resp.getDecision().name().replaceFirst("^MATCH_DECISION_", "");
          String top = resp.getCandidatesCount() > 0 ? resp.getCandidates(0).getPersonId() : "-";
          double score = resp.getCandidatesCount() > 0 ? resp.getCandidates(0).getScore() : 0.0;
          System.out.printf(Locale.ROOT, "%s\t%s\tcandidate=%s\tscore=%.9f%n", args.get(2), decision, top, score);
        } catch (StatusRuntimeException e) {
          System.out.printf("%s\tERROR\t%s%n", args.get(2), e.getStatus());
          failures++;
        }
      } else {
        System.err.println("unknown command");
        System.exit(2);
      }
    } finally {
      managed.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.exit(failures > 0 ? 1 : 0);
  }
}
